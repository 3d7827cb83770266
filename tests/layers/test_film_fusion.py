import keras
import numpy as np
import pytest

from kfusion.layers import FiLMFusion
from tests import helpers
from tests.conftest import requires_tensorflow


@pytest.fixture
def vectors(rng):
    return [
        rng.normal(size=(8, 6)).astype("float32"),  # h
        rng.normal(size=(8, 3)).astype("float32"),  # c
    ]


@pytest.fixture
def sequences(rng):
    return [
        rng.normal(size=(8, 5, 6)).astype("float32"),  # h
        rng.normal(size=(8, 3)).astype("float32"),  # c
    ]


def numpy_film(layer, h, c, activation=lambda x: x):
    wg, bg = layer.gamma_dense.get_weights()
    wb, bb = layer.beta_dense.get_weights()
    gamma = 1.0 + c @ wg + bg
    beta = c @ wb + bb
    if h.ndim == 3:
        gamma, beta = gamma[:, None, :], beta[:, None, :]
    return activation(gamma * h + beta)


def test_config_roundtrip():
    for condition in (-1, 0, "question"):
        clone = helpers.check_config_roundtrip(
            FiLMFusion(condition=condition, activation="relu", name="film")
        )
        assert clone.condition == condition
    assert FiLMFusion().get_config()["activation"] is None


@pytest.mark.parametrize("data", ["vectors", "sequences"])
def test_symbolic_matches_eager(request, data):
    arrays = request.getfixturevalue(data)
    out = helpers.check_symbolic_matches_eager(FiLMFusion(), arrays)
    assert tuple(out.shape) == arrays[0].shape


@pytest.mark.parametrize("data", ["vectors", "sequences"])
def test_matches_numpy_formula(request, data):
    h, c = request.getfixturevalue(data)
    layer = FiLMFusion(activation="relu")
    out = helpers.as_numpy(layer([h, c]))
    expected = numpy_film(layer, h, c, activation=lambda x: np.maximum(x, 0.0))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert (out == 0).any() and (out > 0).any()  # the activation really applied


def test_default_init_starts_near_identity(sequences):
    """Default (non-zero) init; the `1 +` centres gamma, so the output tracks h."""
    h, c = sequences
    layer = FiLMFusion()
    out = helpers.as_numpy(layer([h, c]))
    assert np.abs(layer.gamma_dense.get_weights()[0]).max() > 0  # kernels not zero-initialised
    correlation = np.corrcoef(out.ravel(), h.ravel())[0, 1]
    assert correlation > 0.5, correlation


@pytest.mark.parametrize("condition", [0, -2])
def test_condition_picks_the_conditioning_input(sequences, condition):
    h, c = sequences
    layer = FiLMFusion(condition=condition)
    out = helpers.as_numpy(layer([c, h]))  # c first this time
    assert out.shape == h.shape
    np.testing.assert_allclose(out, numpy_film(layer, h, c), rtol=1e-5, atol=1e-6)


def test_dict_inputs(sequences):
    h, c = sequences
    by_key = FiLMFusion(condition="question")
    out = helpers.as_numpy(by_key({"question": c, "image": h}))
    np.testing.assert_allclose(out, numpy_film(by_key, h, c), rtol=1e-5, atol=1e-6)
    # An int indexes the sorted keys: "image" < "question", so 1 is the question.
    by_index = FiLMFusion(condition=1)
    out = helpers.as_numpy(by_index({"question": c, "image": h}))
    np.testing.assert_allclose(out, numpy_film(by_index, h, c), rtol=1e-5, atol=1e-6)


def test_weight_count(sequences):
    layer = FiLMFusion()
    layer.build([(None, 5, 6), (None, 3)])
    assert layer.count_params() == 2 * (3 * 6 + 6)
    assert len(layer.weights) == 4
    swapped = FiLMFusion(condition=0)
    swapped.build([(None, 3), (None, 6)])
    assert swapped.count_params() == 2 * (3 * 6 + 6)


@pytest.mark.parametrize("data", ["vectors", "sequences"])
def test_fit_step(request, data):
    helpers.check_fit_step(FiLMFusion(activation="tanh"), request.getfixturevalue(data))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(sequences, policy):
    layer, out = helpers.check_mixed_precision(FiLMFusion, sequences, policy)
    expected = numpy_film(layer, *sequences)
    got = helpers.as_numpy(keras.ops.cast(out, "float32"))
    np.testing.assert_allclose(got, expected, rtol=0.05, atol=0.05)


def test_mask_of_h_passes_through(sequences):
    h, c = sequences
    mask = np.arange(5)[None, :] < np.array([5, 4, 3, 2, 1, 5, 4, 3])[:, None]
    layer = FiLMFusion()
    got = layer.compute_mask([h, c], [mask, None])
    np.testing.assert_array_equal(helpers.as_numpy(got), mask)
    swapped = FiLMFusion(condition=0)
    got = swapped.compute_mask([c, h], [None, mask])
    np.testing.assert_array_equal(helpers.as_numpy(got), mask)
    assert layer.compute_mask([h, c], None) is None


def test_keras_mask_propagates_and_padding_is_harmless(rng):
    """Embedding(mask_zero) -> FiLM: output mask is h's, valid steps ignore padding."""
    ids = rng.integers(1, 20, size=(8, 5)).astype("int32")
    ids[:4, 3:] = 0  # some samples are shorter
    c = rng.normal(size=(8, 3)).astype("float32")
    embedding = keras.layers.Embedding(20, 6, mask_zero=True)
    layer = FiLMFusion()
    seen_masks = []

    class MaskProbe(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.supports_masking = True

        def call(self, x, mask=None):
            seen_masks.append(mask)
            return x

    def run(steps, ids_):
        token_input, c_input = keras.Input((steps,), dtype="int32"), keras.Input((3,))
        out = layer([embedding(token_input), c_input])
        assert out._keras_mask is not None  # symbolic mask of h carried through
        model = keras.Model([token_input, c_input], MaskProbe()(out))
        return model([ids_, c])

    plain = helpers.as_numpy(run(5, ids))
    padded_ids = np.concatenate([ids, np.zeros((8, 4), "int32")], axis=1)
    padded = helpers.as_numpy(run(9, padded_ids))
    np.testing.assert_allclose(padded[:, :5], plain, rtol=1e-6)
    np.testing.assert_array_equal(helpers.as_numpy(seen_masks[-1]), padded_ids > 0)


def test_save_and_load(sequences, tmp_path):
    helpers.check_saving(FiLMFusion(activation="relu"), sequences, tmp_path)


def test_save_and_load_dict_with_key_condition(sequences, tmp_path):
    x = {"image": sequences[0], "question": sequences[1]}
    helpers.check_saving(FiLMFusion(condition="question"), x, tmp_path)


@requires_tensorflow
def test_saved_model_export(sequences, tmp_path):
    helpers.check_saved_model(FiLMFusion(), sequences, tmp_path)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"condition": 2}, "condition"),
        ({"condition": -3}, "condition"),
        ({"condition": 1.0}, "condition"),
        ({"condition": True}, "condition"),
        ({"condition": ""}, "condition"),
        ({"condition": None}, "condition"),
        ({"activation": "no_such_activation"}, "activation"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}={kwargs[name]!r}".replace(".", r"\.")):
        FiLMFusion(**kwargs)


def test_bad_inputs(sequences):
    h, c = sequences
    with pytest.raises(ValueError, match="single input"):
        FiLMFusion()(h)
    with pytest.raises(ValueError, match="exactly 2 inputs. Received: 1 inputs"):
        FiLMFusion()([h])
    with pytest.raises(ValueError, match="exactly 2 inputs. Received: 3 inputs"):
        FiLMFusion()([h, c, c])
    with pytest.raises(ValueError, match="conditioning input"):
        FiLMFusion()([h, h])  # a rank-3 conditioner
    with pytest.raises(ValueError, match="rank 2 or 3"):
        FiLMFusion()([np.ones((8, 2, 2, 6), "float32"), c])
    with pytest.raises(ValueError, match="condition='question'"):
        FiLMFusion(condition="question")([h, c])  # a key, but a list
    with pytest.raises(ValueError, match="condition='question'"):
        FiLMFusion(condition="question")({"a": h, "b": c})  # key not there
    keras.backend.clear_session()


def test_built_layer_rejects_other_widths(sequences):
    h, c = sequences
    layer = FiLMFusion()
    layer([h, c])
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 6"):
        layer([h[..., :4], c])
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        layer([h, c[:, :2]])


def test_save_and_load_mixed_float16(sequences, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    helpers.check_saving_mixed_float16(
        FiLMFusion(activation="relu"), sequences, tmp_path, atol=1e-3
    )
