import re

import keras
import numpy as np
import pytest

from kfusion.layers import PatchEmbedding
from tests import helpers
from tests.conftest import requires_tensorflow

B, H, W, C = 4, 8, 12, 3


@pytest.fixture
def images(rng):
    return rng.normal(size=(B, H, W, C)).astype("float32")


def numpy_patches(images, layer):
    """ViT: cut non-overlapping patches row by row, flatten, project."""
    kernel, bias = layer.projection.get_weights()  # (ph, pw, C, dim), (dim,)
    ph, pw = layer.patch_size
    rows, cols = images.shape[1] // ph, images.shape[2] // pw
    out = []
    for r in range(rows):
        for c in range(cols):
            patch = images[:, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw, :]
            out.append(patch.reshape(len(images), -1) @ kernel.reshape(-1, kernel.shape[-1]))
    return np.stack(out, axis=1) + bias


def test_config_roundtrip():
    clone = helpers.check_config_roundtrip(PatchEmbedding(patch_size=(2, 3), dim=5))
    assert clone.patch_size == (2, 3)
    square = helpers.check_config_roundtrip(PatchEmbedding(patch_size=4, dim=5))
    assert square.patch_size == (4, 4)


@pytest.mark.parametrize(
    "patch_size, patches",
    [(4, 2 * 3), ((2, 3), 4 * 4), (5, 1 * 2), ((8, 12), 1)],
)
def test_symbolic_matches_eager(images, patch_size, patches):
    out = helpers.check_symbolic_matches_eager(PatchEmbedding(patch_size, 6), images)
    assert tuple(out.shape) == (B, patches, 6)


@pytest.mark.parametrize("patch_size", [4, (2, 3), (3, 5)])
def test_matches_numpy_formula(images, patch_size):
    layer = PatchEmbedding(patch_size, 6)
    out = helpers.as_numpy(layer(images))
    np.testing.assert_allclose(out, numpy_patches(images, layer), rtol=1e-5, atol=1e-5)


def test_unknown_image_size(images):
    inputs = keras.Input((None, None, C))
    out = PatchEmbedding(4, 6)(inputs)
    assert tuple(out.shape) == (None, None, 6)
    model = keras.Model(inputs, out)
    assert tuple(model(images).shape) == (B, 6, 6)
    assert tuple(model(images[:, :4, :4]).shape) == (B, 1, 6)


def test_weight_count():
    layer = PatchEmbedding((2, 3), 6)
    layer.build((None, H, W, C))
    assert layer.count_params() == 2 * 3 * C * 6 + 6
    assert len(layer.weights) == 2


def test_fit_step(images):
    helpers.check_fit_step(PatchEmbedding(4, 6), images)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(images, policy):
    helpers.check_mixed_precision(lambda: PatchEmbedding(4, 6), images, policy)


def test_no_mask_is_produced(images):
    layer = PatchEmbedding(4, 6)
    assert layer.compute_mask(images, None) is None
    out = layer(keras.Input((H, W, C)))
    assert getattr(out, "_keras_mask", None) is None


def test_save_and_load(images, tmp_path):
    helpers.check_saving(PatchEmbedding((2, 3), 6), images, tmp_path)


@requires_tensorflow
def test_saved_model_export(images, tmp_path):
    helpers.check_saved_model(PatchEmbedding(4, 6), images, tmp_path)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": (2, 0)}, "patch_size"),
        ({"patch_size": (1, 2, 3)}, "patch_size"),
        ({"patch_size": "4"}, "patch_size"),
        ({"patch_size": 2.0}, "patch_size"),
        ({"dim": 0}, "dim"),
        ({"dim": None}, "dim"),
    ],
)
def test_bad_arguments(kwargs, name):
    arguments = {"patch_size": 4, "dim": 6, **kwargs}
    with pytest.raises(ValueError, match=re.escape(f"{name}={kwargs[name]!r}")):
        PatchEmbedding(**arguments)


def test_bad_inputs(images):
    with pytest.raises(ValueError, match=re.escape("H=8, W=12")):
        PatchEmbedding(9, 6)(images)
    with pytest.raises(ValueError, match=re.escape("H=8, W=12")):
        PatchEmbedding((2, 13), 6)(images)
    with pytest.raises(ValueError, match=re.escape("H=3, W=None")):
        PatchEmbedding(4, 6)(keras.Input((3, None, C)))
    with pytest.raises(ValueError, match="rank 4"):
        PatchEmbedding(4, 6)(images[:, 0])


def test_save_and_load_mixed_float16(images, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    helpers.check_saving_mixed_float16(PatchEmbedding((2, 3), 6), images, tmp_path, atol=1e-3)
