import re

import keras
import numpy as np
import pytest

from kfusion.branches import MLP
from tests import helpers
from tests.branches import branch_checks
from tests.conftest import requires_tensorflow


@pytest.fixture
def vectors(rng):
    return rng.normal(size=(8, 5)).astype("float32")


def np_layer_norm(x, layer):
    gamma, beta = layer.get_weights()
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + layer.epsilon) * gamma + beta


def np_batch_norm_inference(x, layer):
    gamma, beta, moving_mean, moving_var = layer.get_weights()
    return (x - moving_mean) / np.sqrt(moving_var + layer.epsilon) * gamma + beta


def test_config_roundtrip():
    branch = MLP(units=[8, 4], activation="gelu", dropout=0.2, normalization="batch", output_dim=3)
    clone = helpers.check_config_roundtrip(branch)
    assert clone.units == (8, 4) and clone.normalization == "batch" and clone.output_dim == 3


def test_default_names_are_unique():
    branch_checks.check_default_names(lambda **kw: MLP(units=4, **kw), "mlp_branch")


@pytest.mark.parametrize("output_dim", [None, 3])
def test_symbolic_matches_eager(vectors, output_dim):
    out = helpers.check_symbolic_matches_eager(MLP(units=(8, 4), output_dim=output_dim), vectors)
    assert tuple(out.shape) == (8, output_dim or 4)


@pytest.mark.parametrize("normalization", [None, "layer", "batch"])
def test_matches_numpy_formula(vectors, normalization):
    branch = MLP(units=(6, 4), activation="tanh", normalization=normalization, output_dim=2)
    branch(vectors)
    branch_checks.randomize_weights(branch, scale=0.3)  # non-trivial gammas and biases
    out = helpers.as_numpy(branch(vectors, training=False))
    h = vectors
    for dense, norm in zip(branch.dense_layers, branch.norm_layers):
        kernel, bias = dense.get_weights()
        h = h @ kernel + bias
        if normalization == "layer":
            h = np_layer_norm(h, norm)
        elif normalization == "batch":
            h = np_batch_norm_inference(h, norm)
        h = np.tanh(h)
    kernel, bias = branch.output_projection.get_weights()
    np.testing.assert_allclose(out, h @ kernel + bias, rtol=1e-4, atol=1e-5)


def test_weight_count():
    branch = MLP(units=(8, 4), normalization="batch", output_dim=2)
    branch.build((None, 5))
    dense = (5 * 8 + 8) + (8 * 4 + 4)
    norms = 4 * 8 + 4 * 4  # gamma, beta, moving mean and variance
    assert branch.count_params() == dense + norms + (4 * 2 + 2)
    assert len(branch.trainable_weights) == 4 + 4 + 2
    plain = MLP(units=3)
    plain.build((None, 5))
    assert plain.count_params() == 5 * 3 + 3


@pytest.mark.parametrize("pooling", ["mean", "max", "last", None])
def test_pooling_has_no_effect_on_vectors(vectors, pooling):
    branch = MLP(units=4, pooling=pooling)
    reference = MLP(units=4)
    branch(vectors)
    reference(vectors)
    reference.set_weights(branch.get_weights())
    out = helpers.as_numpy(branch(vectors))
    np.testing.assert_allclose(out, helpers.as_numpy(reference(vectors)), rtol=1e-6)
    assert out.shape == (8, 4)
    assert branch.compute_mask(vectors) is None


def test_fit_step(vectors):
    helpers.check_fit_step(MLP(units=(8, 4), dropout=0.1, normalization="batch"), vectors)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("normalization", ["layer", "batch"])
def test_mixed_precision(vectors, policy, normalization):
    helpers.check_mixed_precision(
        lambda: MLP(units=(8, 4), normalization=normalization, output_dim=2), vectors, policy
    )


def test_save_and_load(vectors, tmp_path):
    branch = MLP(units=(8, 4), normalization="batch", output_dim=3)
    loaded = helpers.check_saving(branch, vectors, tmp_path)
    assert isinstance(loaded.layers[-1], MLP)


@requires_tensorflow
def test_saved_model_export(vectors, tmp_path):
    helpers.check_saved_model(MLP(units=(8, 4), normalization="layer"), vectors, tmp_path)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"units": 0}, "units"),
        ({"units": []}, "units"),
        ({"units": (4, -1)}, "units"),
        ({"activation": "no_such_activation"}, "activation"),
        ({"dropout": 1.5}, "dropout"),
        ({"normalization": "group"}, "normalization"),
        ({"pooling": "first"}, "pooling"),
        ({"output_dim": 0}, "output_dim"),
        ({"vocab_size": 10}, "vocab_size"),  # an MLP does not take token ids
        ({"embedding_dim": 0}, "embedding_dim"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=re.escape(f"{name}={kwargs[name]!r}")):
        MLP(**kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="cannot take input"):
        MLP(units=4)(np.ones((2, 3, 4), "float32"))  # a sequence
    with pytest.raises(ValueError, match="cannot take input"):
        MLP(units=4)(np.ones((2, 4, 4, 3), "float32"))  # an image
    with pytest.raises(ValueError, match="cannot take input"):
        MLP(units=4)(np.ones((2, 3, 4, 5, 2), "float32"))  # rank 5
    with pytest.raises(ValueError, match="cannot take input.*int32"):
        MLP(units=4)(np.ones((2, 5), "int32"))  # integer ids, and no vocab_size to embed them
    with pytest.raises(ValueError, match="known feature"):
        MLP(units=4)(keras.Input((None,)))


def test_trainable_false_freezes_every_sublayer():
    frozen = MLP(units=(4, 4), normalization="batch", output_dim=2, trainable=False)
    frozen.build((None, 3))
    assert frozen.trainable_weights == []
    assert len(frozen.non_trainable_weights) == len(frozen.weights) > 0


def test_save_and_load_mixed_float16(vectors, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    helpers.check_saving_mixed_float16(
        MLP(units=(8, 4), normalization="batch", output_dim=3), vectors, tmp_path, atol=1e-3
    )
