import re

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion.branches import InceptionTime
from tests import helpers
from tests.branches import branch_checks
from tests.branches.branch_checks import VOCAB, check_right_padding_under_a_mask, randomize
from tests.conftest import requires_tensorflow

SMALL = {"depth": 3, "filters": 2, "kernel_sizes": (7, 5, 3), "bottleneck_size": 3}
WIDTH = 8  # (3 kernel sizes + the pooling path) * 2 filters


def make(kind="sequence", **kwargs):
    kwargs = {**SMALL, **kwargs}
    if kind == "tokens":
        kwargs.setdefault("vocab_size", VOCAB)
        kwargs.setdefault("embedding_dim", 4)
    return InceptionTime(**kwargs)


# ----------------------------------------------------------------------------- config, shapes
def test_paper_defaults():
    branch = InceptionTime()
    assert branch.depth == 6 and branch.filters == 32 and branch.bottleneck_size == 32
    assert branch.kernel_sizes == (40, 20, 10) and branch.use_residual
    assert branch.pooling == "mean" and branch.norm_momentum == 0.9
    branch.build((None, None, 1))
    # No bottleneck on the one-channel input, one on every later module.
    assert [b is not None for b in branch.bottleneck_convs] == [False] + [True] * 5
    assert len(branch.shortcut_convs) == 2
    paths = 32 * (40 + 20 + 10) * 32  # bias-free, on the 32-channel bottleneck output
    first = 1 * (40 + 20 + 10) * 32 + 1 * 32 + 4 * 128  # kernels, pool path, BN
    later = 128 * 32 + paths + 128 * 32 + 4 * 128  # bottleneck, kernels, pool path, BN
    shortcuts = (1 * 128 + 4 * 128) + (128 * 128 + 4 * 128)
    assert branch.count_params() == first + 5 * later + shortcuts


def test_residual_bottleneck_and_depth_options():
    plain = InceptionTime(depth=4, filters=2, use_residual=False, bottleneck_size=None)
    plain.build((None, 10, 3))
    assert plain.shortcut_convs == [] and all(b is None for b in plain.bottleneck_convs)
    seven = InceptionTime(depth=7, filters=2, kernel_sizes=(3,))
    seven.build((None, 10, 3))
    assert len(seven.shortcut_convs) == 2  # after modules 3 and 6; module 7 has none
    assert seven.compute_output_shape((None, 10, 3)) == (None, 4)


def test_config_roundtrip():
    branch = InceptionTime(
        depth=4,
        filters=3,
        kernel_sizes=[9, 5],
        bottleneck_size=None,
        use_residual=False,
        dropout=0.2,
        norm_momentum=0.8,
        pooling="max",
        output_dim=3,
        vocab_size=30,
        embedding_dim=5,
    )
    clone = helpers.check_config_roundtrip(branch)
    assert clone.depth == 4 and clone.kernel_sizes == (9, 5) and clone.bottleneck_size is None
    assert clone.norm_momentum == 0.8 and clone.norm_layers[0].momentum == 0.8
    old = branch.get_config()
    del old["norm_momentum"]  # written before the argument existed
    assert InceptionTime.from_config(old).norm_momentum == 0.9


def test_default_names_are_unique():
    branch_checks.check_default_names(lambda **kw: make(**kw), "inception_time_branch")


@pytest.mark.parametrize("kind", ["tokens", "sequence"])
@pytest.mark.parametrize("pooling", ["mean", None])
def test_symbolic_matches_eager(inputs_by_kind, kind, pooling):
    out = helpers.check_symbolic_matches_eager(make(kind, pooling=pooling), inputs_by_kind[kind])
    expected = {"tokens": (4, 8, WIDTH), "sequence": (4, 7, WIDTH)}[kind]
    assert tuple(out.shape) == (expected if pooling is None else (4, WIDTH))


def test_variable_length(rng):
    branch = make(output_dim=2)
    assert tuple(branch(keras.Input((None, 3))).shape) == (None, 2)
    for steps in (1, 9, 30):
        assert tuple(branch(rng.normal(size=(2, steps, 3)).astype("float32")).shape) == (2, 2)


# ----------------------------------------------------------------------------- padding, masks
@pytest.mark.parametrize("pooling", ["mean", "max", "last", None])
def test_right_padding_under_a_mask_changes_no_output(rng, pooling):
    check_right_padding_under_a_mask(make(pooling=pooling), rng)


def test_padding_never_wins_the_max_pool_path(rng):
    # Negative inputs: a zeroed padded step would win the max pooling at the last valid
    # step. Without the bottleneck, on one channel, the pooling path reads the raw input.
    branch = make(depth=1, bottleneck_size=None, pooling=None)
    inputs = keras.Input((None, 1))
    model = keras.Model(inputs, branch(keras.layers.Masking(0.0)(inputs)))
    randomize(branch)
    x = -1.0 - rng.uniform(size=(2, 6, 1)).astype("float32")
    padded = np.concatenate([x, np.zeros((2, 16, 1), "float32")], axis=1)
    expected = helpers.as_numpy(model(x, training=False))
    got = helpers.as_numpy(model(padded, training=False))[:, :6]
    assert np.max(np.abs(got - expected)) <= 1e-5


@pytest.mark.parametrize("pooling", ["mean", "max", None])
def test_token_padding_never_changes_the_output(ids, pooling):
    branch_checks.check_token_padding_invariance(make("tokens", pooling=pooling), ids)


def test_masked_padding_under_mixed_float16(rng):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    branch = make(pooling="max")
    x, mask = branch_checks.padded_sequences(rng, [5, 3, 6, 1], total=8, features=3)
    out = branch(x, mask=mask, training=False)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    out = helpers.as_numpy(out).astype("float32")
    assert np.all(np.isfinite(out))
    for i, length in enumerate([5, 3, 6, 1]):
        alone = helpers.as_numpy(branch(x[i : i + 1, :length], training=False))[0]
        np.testing.assert_allclose(out[i], alone.astype("float32"), atol=1e-2, rtol=1e-2)


def test_batch_norm_statistics_ignore_padded_steps(ids):
    branch = make("tokens", pooling=None)
    short_out = helpers.as_numpy(branch(ids, training=True))
    long_out = helpers.as_numpy(branch(np.pad(ids, ((0, 0), (0, 4))), training=True))
    valid = ids != 0
    np.testing.assert_allclose(long_out[:, :8][valid], short_out[valid], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- training, dtypes
def test_fit_step(ids):  # sequences train in test_learns_sequence_classification
    helpers.check_fit_step(make("tokens", depth=3, dropout=0.1), ids)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(seq, policy):
    _, out = helpers.check_mixed_precision(lambda: make(pooling="max"), seq, policy)
    assert tuple(out.shape) == (4, WIDTH)


def test_save_and_load(seq, tmp_path):
    loaded = helpers.check_saving(make(output_dim=3, dropout=0.1), seq, tmp_path)
    assert isinstance(loaded.layers[-1], InceptionTime)


@requires_tensorflow
def test_saved_model_export(seq, tmp_path):
    helpers.check_saved_model(make(pooling="last"), seq, tmp_path)


def test_save_and_load_mixed_float16(ids, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    helpers.check_saving_mixed_float16(make("tokens", pooling="max"), ids, tmp_path, atol=1e-3)


def test_learns_sequence_classification():
    x, y = kf.datasets.sequence_classification(n=240, length=16, features=4, seed=0)
    model = kf.FusionModel(
        inputs=keras.Input((None, 4)),
        branches=[InceptionTime(depth=3, filters=4, kernel_sizes=(9, 5, 3), bottleneck_size=4)],
        head=kf.heads.Classification(3),
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), metrics=["accuracy"])
    model.fit(x[:192], y[:192], epochs=5, batch_size=32, verbose=0)  # 30 steps
    held_out = model.evaluate(x[192:], y[192:], verbose=0, return_dict=True)["accuracy"]
    assert held_out > 0.8  # chance: 1/3


def test_from_spec():
    spec = {
        "inputs": {"signal": {"shape": [None, 4]}},
        "branches": [{"type": "InceptionTime", "depth": 3, "filters": 2, "kernel_sizes": [5, 3]}],
        "head": {"type": "Classification", "num_classes": 3},
    }
    model = kf.FusionModel.from_spec(spec)
    (branch,) = model.branch_layers
    assert isinstance(branch, InceptionTime) and branch.depth == 3
    assert model.predict(np.ones((2, 10, 4), "float32"), verbose=0).shape == (2, 3)
    assert kf.FusionModel.from_spec(model.to_spec()).to_spec() == model.to_spec()


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"depth": 0}, "depth"),
        ({"depth": 2.0}, "depth"),
        ({"filters": 0}, "filters"),
        ({"filters": (32, 32)}, "filters"),
        ({"kernel_sizes": []}, "kernel_sizes"),
        ({"kernel_sizes": (40, 0)}, "kernel_sizes"),
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"use_residual": 1}, "use_residual"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm_momentum": -0.5}, "norm_momentum"),
        ({"pooling": "cls"}, "pooling"),
        ({"output_dim": 0}, "output_dim"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"embedding_dim": 0}, "embedding_dim"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=re.escape(f"{name}={kwargs[name]!r}")):
        InceptionTime(**kwargs)


def test_bad_inputs(images):
    with pytest.raises(ValueError, match="cannot take input"):
        make()(images)
    with pytest.raises(ValueError, match="cannot take input"):
        make()(np.ones((2, 5), "float32"))
