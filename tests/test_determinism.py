"""Reproducible training on TensorFlow: seed + op determinism give identical weights.

`tf.config.experimental.enable_op_determinism()` is process-global and cannot be turned
off again, so the trainings run in a fresh Python process.
"""

import os
import subprocess
import sys
import textwrap

from tests.conftest import requires_tensorflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import keras, numpy as np, tensorflow as tf
    import kfusion as kf

    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    x = {"signal": rng.normal(size=(64, 8, 3)).astype("float32"),
         "table": rng.normal(size=(64, 4)).astype("float32")}
    y = (x["signal"][:, :, 0].mean(1) + x["table"][:, 0] > 0).astype("int32")

    def train(seed):
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        model = kf.FusionModel(
            inputs={"signal": keras.Input((8, 3)), "table": keras.Input((4,))},
            branches={
                "signal": [kf.branches.CNN(filters=(8,), dropout=0.2)],
                "table": [kf.branches.MLP(units=(8,), dropout=0.2)],
            },
            fusion="gated",
            head=kf.heads.Classification(2, hidden_units=(8,), dropout=0.2),
        )
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
        model.fit(x, y, epochs=2, batch_size=16, shuffle=True, verbose=0)
        return model.get_weights()

    first, again, other = train(1), train(1), train(2)
    assert len(first) == len(again) > 8
    same = all(np.array_equal(a, b) for a, b in zip(first, again))
    moved = any(not np.array_equal(a, b) for a, b in zip(first, other))
    print("SAME" if same else "DIFFERENT", "SEED_MATTERS" if moved else "SEED_IGNORED")
    """
)


@requires_tensorflow
def test_two_seeded_trainings_give_identical_weights():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Dropout, shuffling and initialisation all follow the seed: the same seed gives the
    # same weights bit for bit, another seed gives other weights.
    assert result.stdout.split()[-2:] == ["SAME", "SEED_MATTERS"], result.stdout
