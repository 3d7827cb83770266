import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

BACKEND = keras.config.backend()


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {BACKEND}"


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from the float32 policy, a fixed seed and a clean session."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")
    # free_memory=False: a full gc.collect() after every test costs about a second with
    # TensorFlow loaded; reference counting frees what the tests leave behind.
    keras.backend.clear_session(free_memory=False)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


requires_tensorflow = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="needs the TensorFlow backend (a TensorFlow format or tf.distribute)",
)
