import re

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion.branches import FCN
from tests import helpers
from tests.branches import branch_checks
from tests.branches.branch_checks import (
    VOCAB,
    check_right_padding_under_a_mask,
    np_batch_norm,
    np_conv1d_same,
    randomize,
)
from tests.conftest import requires_tensorflow

SMALL = {"filters": (6, 8, 5), "kernel_sizes": (5, 3, 3)}


def make(kind="sequence", **kwargs):
    kwargs = {**SMALL, **kwargs}
    if kind == "tokens":
        kwargs.setdefault("vocab_size", VOCAB)
        kwargs.setdefault("embedding_dim", 4)
    return FCN(**kwargs)


# ----------------------------------------------------------------------------- config, shapes
def test_paper_defaults():
    branch = FCN()
    assert branch.filters == (128, 256, 128) and branch.kernel_sizes == (8, 5, 3)
    assert branch.pooling == "mean" and branch.norm_momentum == 0.9
    branch.build((None, None, 1))
    convs = (1 * 8 * 128 + 128) + (128 * 5 * 256 + 256) + (256 * 3 * 128 + 128)
    norms = 4 * (128 + 256 + 128)  # gamma, beta, moving mean and variance
    assert branch.count_params() == convs + norms


def test_config_roundtrip():
    branch = FCN(
        filters=[4, 6],
        kernel_sizes=[7, 3],
        dropout=0.2,
        norm_momentum=0.8,
        pooling="max",
        output_dim=3,
        vocab_size=30,
        embedding_dim=5,
    )
    clone = helpers.check_config_roundtrip(branch)
    assert clone.filters == (4, 6) and clone.kernel_sizes == (7, 3)
    assert clone.norm_momentum == 0.8 and clone.norm_layers[0].momentum == 0.8
    old = branch.get_config()
    del old["norm_momentum"]  # written before the argument existed
    assert FCN.from_config(old).norm_momentum == 0.9


def test_default_names_are_unique():
    branch_checks.check_default_names(lambda **kw: make(**kw), "fcn_branch")


@pytest.mark.parametrize("kind", ["tokens", "sequence"])
@pytest.mark.parametrize("pooling", ["mean", None])
def test_symbolic_matches_eager(inputs_by_kind, kind, pooling):
    out = helpers.check_symbolic_matches_eager(make(kind, pooling=pooling), inputs_by_kind[kind])
    expected = {"tokens": (4, 8, 5), "sequence": (4, 7, 5)}[kind]
    assert tuple(out.shape) == (expected if pooling is None else (4, 5))


def test_variable_length(rng):
    branch = make(output_dim=2)
    assert tuple(branch(keras.Input((None, 3))).shape) == (None, 2)
    for steps in (1, 9, 30):
        assert tuple(branch(rng.normal(size=(2, steps, 3)).astype("float32")).shape) == (2, 2)


def test_matches_numpy_formula(seq):
    branch = make(pooling="mean")
    branch(seq)
    randomize(branch)
    out = helpers.as_numpy(branch(seq, training=False))
    h = seq
    for conv, norm in zip(branch.conv_layers, branch.norm_layers):
        h = np.maximum(np_batch_norm(np_conv1d_same(h, *conv.get_weights()), norm), 0.0)
    np.testing.assert_allclose(out, h.mean(axis=1), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- padding, masks
@pytest.mark.parametrize("pooling", ["mean", "max", "last", None])
def test_right_padding_under_a_mask_changes_no_output(rng, pooling):
    check_right_padding_under_a_mask(make(pooling=pooling), rng)


@pytest.mark.parametrize("pooling", ["mean", "max", None])
def test_token_padding_never_changes_the_output(ids, pooling):
    branch_checks.check_token_padding_invariance(make("tokens", pooling=pooling), ids)


def test_batch_norm_statistics_ignore_padded_steps(ids):
    branch = make("tokens", pooling=None)
    short_out = helpers.as_numpy(branch(ids, training=True))
    long_out = helpers.as_numpy(branch(np.pad(ids, ((0, 0), (0, 4))), training=True))
    valid = ids != 0
    np.testing.assert_allclose(long_out[:, :8][valid], short_out[valid], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- training, dtypes
def test_fit_step(ids):  # sequences train in test_learns_sequence_classification
    helpers.check_fit_step(make("tokens", dropout=0.1), ids)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(seq, policy):
    _, out = helpers.check_mixed_precision(lambda: make(pooling="max"), seq, policy)
    assert tuple(out.shape) == (4, 5)


def test_save_and_load(seq, tmp_path):
    loaded = helpers.check_saving(make(output_dim=3, dropout=0.1), seq, tmp_path)
    assert isinstance(loaded.layers[-1], FCN)


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
        branches=[FCN(filters=(8, 16, 8), kernel_sizes=(5, 3, 3))],
        head=kf.heads.Classification(3),
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), metrics=["accuracy"])
    model.fit(x[:192], y[:192], epochs=5, batch_size=32, verbose=0)  # 30 steps
    held_out = model.evaluate(x[192:], y[192:], verbose=0, return_dict=True)["accuracy"]
    assert held_out > 0.8  # chance: 1/3


def test_from_spec():
    spec = {
        "inputs": {"signal": {"shape": [None, 4]}},
        "branches": [{"type": "FCN", "filters": [4, 8, 4], "kernel_sizes": [5, 3, 3]}],
        "head": {"type": "Classification", "num_classes": 3},
    }
    model = kf.FusionModel.from_spec(spec)
    (branch,) = model.branch_layers
    assert isinstance(branch, FCN) and branch.filters == (4, 8, 4)
    assert model.predict(np.ones((2, 10, 4), "float32"), verbose=0).shape == (2, 3)
    assert kf.FusionModel.from_spec(model.to_spec()).to_spec() == model.to_spec()


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"filters": 0}, "filters"),
        ({"filters": []}, "filters"),
        ({"kernel_sizes": (8, 0, 3)}, "kernel_sizes"),
        ({"kernel_sizes": (8, 5)}, "kernel_sizes"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm_momentum": 1.0}, "norm_momentum"),
        ({"norm_momentum": "0.9"}, "norm_momentum"),
        ({"pooling": "cls"}, "pooling"),
        ({"output_dim": 0}, "output_dim"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"embedding_dim": 0}, "embedding_dim"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=re.escape(f"{name}={kwargs[name]!r}")):
        FCN(**kwargs)


def test_bad_inputs(images):
    with pytest.raises(ValueError, match="cannot take input"):
        make()(images)
    with pytest.raises(ValueError, match="cannot take input"):
        make()(np.ones((2, 5), "float32"))
    with pytest.raises(ValueError, match="vocab_size"):
        make()(np.ones((2, 5), "int32"))
