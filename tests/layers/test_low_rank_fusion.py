import keras
import numpy as np
import pytest

from kfusion.layers import LowRankFusion
from tests import helpers
from tests.conftest import requires_tensorflow


@pytest.fixture
def arrays(rng):
    return [
        rng.normal(size=(8, 3)).astype("float32"),
        rng.normal(size=(8, 5)).astype("float32"),
        rng.normal(size=(8, 2)).astype("float32"),
    ]


def numpy_low_rank(layer, arrays):
    """out = sum_r w_r prod_m ([h_m; 1] W_m[r]) + b on the layer's weights (float64)."""
    weights = layer.get_weights()
    factors, rank_weights, bias = weights[:-2], weights[-2], weights[-1]
    product = 1.0
    for h, factor in zip(arrays, factors):
        z = np.concatenate([h, np.ones((len(h), 1))], axis=-1).astype("float64")
        product = product * np.einsum("bd,rdu->bru", z, factor)
    return np.einsum("bru,r->bu", product, rank_weights) + bias


def test_config_roundtrip():
    clone = helpers.check_config_roundtrip(LowRankFusion(units=6, rank=3, name="lmf"))
    assert (clone.units, clone.rank) == (6, 3)


@pytest.mark.parametrize("rank", [1, 4])
def test_symbolic_matches_eager(arrays, rank):
    out = helpers.check_symbolic_matches_eager(LowRankFusion(units=6, rank=rank), arrays)
    assert tuple(out.shape) == (8, 6)


def test_matches_numpy_formula(arrays, rng):
    layer = LowRankFusion(units=6, rank=3)
    layer(arrays)
    # Non-trivial rank weights and bias, so every term of the formula is exercised.
    weights = layer.get_weights()
    weights[-2] = rng.normal(size=weights[-2].shape).astype("float32")
    weights[-1] = rng.normal(size=weights[-1].shape).astype("float32")
    layer.set_weights(weights)
    out = helpers.as_numpy(layer(arrays))
    np.testing.assert_allclose(out, numpy_low_rank(layer, arrays), rtol=1e-4, atol=1e-5)


def test_weight_shapes_and_names(arrays):
    layer = LowRankFusion(units=6, rank=3)
    layer(arrays)
    shapes = {v.path.split("/")[-1]: tuple(v.shape) for v in layer.weights}
    assert shapes == {
        "factor_0": (3, 4, 6),
        "factor_1": (3, 6, 6),
        "factor_2": (3, 3, 6),
        "rank_weights": (3,),
        "bias": (6,),
    }


def test_dict_inputs_read_in_sorted_key_order(arrays):
    layer = LowRankFusion(units=4, rank=2)
    as_list = helpers.as_numpy(layer(arrays))
    as_dict = {"z": arrays[2], "a": arrays[0], "m": arrays[1]}
    np.testing.assert_allclose(helpers.as_numpy(layer(as_dict)), as_list, rtol=1e-6)


def test_weight_count():
    layer = LowRankFusion(units=4, rank=3)
    layer.build([(None, 3), (None, 5)])
    assert layer.count_params() == 3 * 4 * 4 + 3 * 6 * 4 + 3 + 4
    assert len(layer.weights) == 4


@pytest.mark.parametrize("branches", [2, 6])
def test_initial_output_variance_is_sane(rng, branches):
    """The init keeps the output variance of order 1 however many branches are fused."""
    x = [rng.normal(size=(512, 16)).astype("float32") for _ in range(branches)]
    variances = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        out = helpers.as_numpy(LowRankFusion(units=16, rank=4)(x))
        variances.append(out.var())
    assert 0.2 < np.median(variances) < 5.0, variances


def test_fit_step(arrays):
    helpers.check_fit_step(LowRankFusion(units=4, rank=2), arrays)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(arrays, policy):
    layer, out = helpers.check_mixed_precision(
        lambda: LowRankFusion(units=4, rank=2), arrays, policy
    )
    reference = LowRankFusion(units=4, rank=2)
    reference(arrays)
    reference.set_weights(layer.get_weights())
    expected = helpers.as_numpy(reference(arrays))
    got = helpers.as_numpy(keras.ops.cast(out, "float32"))
    np.testing.assert_allclose(got, expected, rtol=0.05, atol=0.05)


def test_masks_are_consumed(arrays):
    assert LowRankFusion(units=4).compute_mask(arrays, [None, None, None]) is None


def test_save_and_load(arrays, tmp_path):
    helpers.check_saving(LowRankFusion(units=4, rank=3), arrays, tmp_path)


@requires_tensorflow
def test_saved_model_export(arrays, tmp_path):
    helpers.check_saved_model(LowRankFusion(units=4, rank=3), arrays, tmp_path)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"units": 0}, "units"),
        ({"units": -3}, "units"),
        ({"units": 2.5}, "units"),
        ({"units": None}, "units"),
        ({"units": 4, "rank": 0}, "rank"),
        ({"units": 4, "rank": 1.5}, "rank"),
        ({"units": 4, "rank": True}, "rank"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}={kwargs[name]!r}".replace(".", r"\.")):
        LowRankFusion(**kwargs)


def test_bad_inputs(arrays):
    with pytest.raises(ValueError, match="single input"):
        LowRankFusion(units=4)(arrays[0])
    with pytest.raises(ValueError, match="at least 2"):
        LowRankFusion(units=4)([arrays[0]])
    with pytest.raises(ValueError, match="rank 2"):
        LowRankFusion(units=4)([arrays[0], np.ones((8, 4, 2), "float32")])
    with pytest.raises(ValueError, match="known feature size"):
        LowRankFusion(units=4)([keras.Input((3,)), keras.Input((None,))])
    keras.backend.clear_session()


def test_built_layer_rejects_other_inputs(arrays):
    helpers.check_built_fusion_rejects_other_inputs(LowRankFusion(units=4), arrays)


def test_save_and_load_mixed_float16(arrays, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    helpers.check_saving_mixed_float16(LowRankFusion(units=4, rank=3), arrays, tmp_path, atol=1e-3)
