import os

import keras
import numpy as np
import pytest

from kfusion.branches import Backbone
from kfusion.branches import backbone as backbone_module
from tests import helpers
from tests.branches import branch_checks
from tests.conftest import requires_tensorflow

APP = "MobileNetV3Small"  # the smallest keras.applications model; weights=None everywhere
APP_PARAMS = 939120  # MobileNetV3Small(include_top=False).count_params()


def tiny_model(channels=3, size=None, name="tiny"):
    """A small image network: conv (stride 2, valid) -> BN -> relu -> conv (same)."""
    inputs = keras.Input((size, size, channels))
    x = keras.layers.Conv2D(4, 3, strides=2, name="conv_1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv_2")(x)
    return keras.Model(inputs, x, name=name)


TINY_PARAMS = (27 * 4 + 4) + 4 * 4 + (36 * 6 + 6)  # conv_1 + bn (gamma, beta, mean, var) + conv_2


@pytest.fixture
def images(rng):
    return rng.uniform(0, 255, size=(4, 16, 16, 3)).astype("float32")


@pytest.fixture
def images32(rng):
    return rng.uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")


def _pool(features, pooling):
    tokens = features.reshape(features.shape[0], -1, features.shape[-1])
    if pooling == "mean":
        return tokens.mean(axis=1)
    if pooling == "max":
        return tokens.max(axis=1)
    return tokens


def _resize(x, size):
    return helpers.as_numpy(keras.ops.image.resize(x, size, interpolation="bilinear"))


# ------------------------------------------------------------------ config, names, shapes
def test_config_roundtrip_named_model():
    branch = Backbone(
        APP, trainable=False, input_size=(40, 48), pooling=None, output_dim=8, preprocess=False
    )
    clone = helpers.check_config_roundtrip(branch)
    assert clone.model == APP and clone.input_size == (40, 48) and not clone.trainable
    assert clone.pooling is None and clone.output_dim == 8 and clone.preprocess is False


def test_config_roundtrip_user_model_is_serialized():
    branch = Backbone(tiny_model(), pooling="max", input_size=20)
    config = branch.get_config()
    assert config["model"]["class_name"] == "Functional"
    assert config["input_size"] == [20, 20]
    clone = helpers.check_config_roundtrip(branch)
    assert isinstance(clone.model, keras.Model) and clone.model is not branch.model
    assert [layer.name for layer in clone.model.layers] == [
        layer.name for layer in branch.model.layers
    ]


def test_config_records_no_weights_source(tmp_path):
    path = str(tmp_path / "tiny.weights.h5")
    tiny_model().save_weights(path)
    assert Backbone(tiny_model(), weights=path).get_config()["weights"] is None


def test_default_names():
    model = tiny_model()
    branch_checks.check_default_names(lambda **kw: Backbone(model, **kw), "backbone_branch")


@pytest.mark.parametrize("pooling, shape", [("mean", (4, 6)), ("max", (4, 6)), (None, (4, 49, 6))])
def test_symbolic_matches_eager(images, pooling, shape):
    out = helpers.check_symbolic_matches_eager(Backbone(tiny_model(), pooling=pooling), images)
    assert tuple(out.shape) == shape


def test_symbolic_matches_eager_named_model(images32):
    branch = Backbone(APP, pooling=None, output_dim=5)
    out = helpers.check_symbolic_matches_eager(branch, images32)
    assert tuple(out.shape) == (2, 1, 5)  # 32x32 -> a 1x1 map of 576 channels, projected
    assert tuple(branch.backbone.input_shape) == (None, 32, 32, 3)


def test_output_shape_before_build():
    assert Backbone(tiny_model()).compute_output_shape((None, 16, 16, 1)) == (None, 6)
    assert Backbone(tiny_model(), pooling=None, output_dim=2).compute_output_shape(
        (None, 20, 12, 3)
    ) == (None, 9 * 5, 2)


def test_unknown_image_size():
    inputs = keras.Input((None, None, 3))
    assert tuple(Backbone(tiny_model())(inputs).shape) == (None, 6)
    assert tuple(Backbone(tiny_model(), pooling=None)(inputs).shape) == (None, None, 6)


# ------------------------------------------------------------------ formulas
@pytest.mark.parametrize("pooling", ["mean", "max", None])
def test_matches_numpy_on_the_models_features(images, pooling):
    model = tiny_model()
    branch = Backbone(model, pooling=pooling, output_dim=5)
    out = helpers.as_numpy(branch(images))
    features = helpers.as_numpy(model(images, training=False))  # a user model: no preprocessing
    kernel, bias = branch.output_projection.get_weights()
    np.testing.assert_allclose(out, _pool(features, pooling) @ kernel + bias, atol=1e-4, rtol=1e-4)


def test_named_model_uses_its_family_preprocessing(images32):
    branch = Backbone("VGG16")  # caffe mode
    out = helpers.as_numpy(branch(images32))
    reference = keras.applications.vgg16.preprocess_input(images32.copy())
    features = helpers.as_numpy(branch.backbone(reference))
    np.testing.assert_allclose(out, _pool(features, "mean"), rtol=1e-4, atol=1e-4)
    raw = Backbone("VGG16", preprocess=False)
    raw(images32)
    raw.backbone.set_weights(branch.backbone.get_weights())
    expected = _pool(helpers.as_numpy(raw.backbone(images32)), "mean")
    np.testing.assert_allclose(helpers.as_numpy(raw(images32)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name, module, mode",
    [
        ("ResNet50", "resnet", "caffe"),
        ("VGG19", "vgg19", "caffe"),
        ("DenseNet121", "densenet", "torch"),
        ("MobileNetV2", "mobilenet_v2", "tf"),
        ("ResNet50V2", "resnet_v2", "tf"),
        ("InceptionV3", "inception_v3", "tf"),
        ("EfficientNetB0", "efficientnet", None),
        ("MobileNetV3Small", "mobilenet_v3", None),
        ("ConvNeXtTiny", "convnext", None),
    ],
)
def test_preprocessing_matches_keras_applications(rng, name, module, mode):
    x = rng.uniform(0, 255, size=(2, 5, 5, 3)).astype("float32")
    assert backbone_module.preprocessing_mode(name) == mode
    assert Backbone(name).preprocessing_mode == mode
    assert Backbone(name, preprocess=False).preprocessing_mode is None
    expected = getattr(keras.applications, module).preprocess_input(x.copy())
    got = helpers.as_numpy(backbone_module.preprocess_images(x, mode))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_every_application_has_a_known_family():
    names = backbone_module.application_names()
    assert {"ResNet50", "VGG16", "EfficientNetB0", "MobileNetV3Small", "ConvNeXtTiny"} <= set(names)
    for name in names:
        assert backbone_module.application_family(name) in backbone_module._FAMILY_PREPROCESSING


# ------------------------------------------------------------------ channels and resizing
def test_grey_and_two_channel_images(images):
    branch = Backbone(tiny_model(), pooling=None)
    grey = images[..., :1]
    np.testing.assert_allclose(
        helpers.as_numpy(branch(grey)),
        helpers.as_numpy(branch(np.repeat(grey, 3, axis=-1))),
        atol=1e-5,
    )
    two = images[..., :2]
    padded = np.concatenate([two, np.zeros_like(grey)], axis=-1)
    np.testing.assert_allclose(
        helpers.as_numpy(branch(two)), helpers.as_numpy(branch(padded)), atol=1e-5
    )


def test_grey_images_with_a_named_model(images32):
    branch = Backbone(APP)
    grey = images32[..., :1]
    out = helpers.as_numpy(branch(grey))
    assert out.shape == (2, 576)
    np.testing.assert_allclose(out, helpers.as_numpy(branch(np.repeat(grey, 3, -1))), atol=1e-4)


def test_small_images_are_enlarged_to_the_minimum_size(images):
    branch = Backbone(APP)
    out = helpers.as_numpy(branch(images))  # 16x16 < 32: resized to 32x32
    assert tuple(branch.backbone.input_shape) == (None, 32, 32, 3)
    np.testing.assert_allclose(
        out, helpers.as_numpy(branch(_resize(images, (32, 32)))), rtol=1e-4, atol=1e-4
    )
    assert Backbone(APP)._target_size((None, 16, 64, 3)) == (32, 64)
    assert Backbone("Xception")._target_size((None, 32, 32, 3)) == (71, 71)
    assert Backbone("InceptionV3")._target_size((None, 100, 120, 3)) == (100, 120)


def test_input_size_resizes(images):
    model = tiny_model()
    branch = Backbone(model, input_size=(20, 24), pooling=None)
    out = helpers.as_numpy(branch(images))
    assert out.shape == (4, 9 * 11, 6)  # (20 - 3) // 2 + 1 = 9, (24 - 3) // 2 + 1 = 11
    expected = helpers.as_numpy(model(_resize(images, (20, 24)), training=False))
    np.testing.assert_allclose(out, _pool(expected, None), rtol=1e-4, atol=1e-4)
    assert Backbone(tiny_model(), input_size=20).input_size == (20, 20)


def test_fixed_size_user_model_gets_images_resized_to_its_size(images):
    model = tiny_model(size=24)
    branch = Backbone(model, pooling="max")
    out = helpers.as_numpy(branch(images))
    expected = helpers.as_numpy(model(_resize(images, (24, 24)), training=False))
    np.testing.assert_allclose(out, _pool(expected, "max"), rtol=1e-4, atol=1e-4)


def test_integer_images(images):
    branch = Backbone(tiny_model())
    pixels = images.astype("uint8")
    np.testing.assert_allclose(
        helpers.as_numpy(branch(pixels)),
        helpers.as_numpy(branch(pixels.astype("float32"))),
        atol=1e-5,
    )


# ------------------------------------------------------------------ weights and training
def test_weight_count(images):
    branch = Backbone(tiny_model(), output_dim=5)
    branch.build((None, 16, 16, 3))
    assert branch.count_params() == TINY_PARAMS + 6 * 5 + 5
    assert len(branch.trainable_weights) == 6 + 2  # BN moving stats are not trainable
    named = Backbone(APP)
    named.build((None, 32, 32, 3))
    assert named.count_params() == APP_PARAMS
    frozen = Backbone(APP, trainable=False)
    frozen.build((None, 32, 32, 3))
    assert frozen.count_params() == APP_PARAMS and not frozen.backbone.trainable
    assert frozen.trainable_weights == [] and len(frozen.non_trainable_weights) == len(
        named.weights
    )


def test_fit_step(images):
    helpers.check_fit_step(Backbone(tiny_model(), output_dim=4), images)


@pytest.mark.parametrize("trainable", [False, True])
def test_trainable_false_keeps_weights_fixed(images, trainable):
    branch = Backbone(tiny_model(), trainable=trainable, output_dim=3)
    model = helpers.wrap(branch, images, head_units=1)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    head = model.layers[-1]
    before = [np.array(w) for w in branch.get_weights()]
    head_before = [np.array(w) for w in head.get_weights()]
    y = np.ones((len(images), 1), "float32")
    model.fit(images, y, epochs=2, batch_size=len(images), verbose=0)
    after = branch.get_weights()
    assert not all(np.allclose(a, b) for a, b in zip(head_before, head.get_weights()))
    if trainable:
        assert len(model.trainable_weights) == 8 + 2
        assert not all(np.allclose(b, a) for b, a in zip(before, after))
        mean = branch.backbone.get_layer("bn").moving_mean
        assert not np.allclose(helpers.as_numpy(mean), 0.0)  # BN ran in training mode
    else:
        assert len(model.trainable_weights) == 2  # only the Dense head
        for b, a in zip(before, after):  # kernels and the BN moving statistics
            np.testing.assert_array_equal(b, a)


def test_frozen_branch_runs_in_inference_mode_and_can_be_unfrozen(images):
    model = tiny_model()
    branch = Backbone(model, trainable=False)
    expected = _pool(helpers.as_numpy(model(images, training=False)), "mean")
    np.testing.assert_allclose(
        helpers.as_numpy(branch(images, training=True)), expected, atol=1e-4, rtol=1e-4
    )
    branch.trainable = True
    assert len(branch.trainable_weights) == 6
    assert not np.allclose(helpers.as_numpy(branch(images, training=True)), expected, atol=1e-3)


def test_weights_from_a_file_named_model(tmp_path, images32):
    source = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    path = str(tmp_path / "mobilenet.weights.h5")
    source.save_weights(path)
    branch = Backbone(APP, weights=path)
    branch.build((None, 32, 32, 3))
    for a, b in zip(source.get_weights(), branch.backbone.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_weights_from_a_file_user_model(tmp_path, images):
    source = tiny_model()
    source.get_layer("conv_2").kernel.assign(np.full((3, 3, 4, 6), 0.25, "float32"))
    path = tmp_path / "tiny.weights.h5"
    source.save_weights(str(path))
    branch = Backbone(tiny_model(), weights=path)
    for a, b in zip(source.get_weights(), branch.backbone.get_weights()):
        np.testing.assert_array_equal(a, b)
    # The saved model carries the weights: it loads without the original file.
    loaded_file = str(tmp_path / "model.keras")
    model = helpers.wrap(branch, images)
    model.save(loaded_file)
    os.remove(path)
    loaded = keras.saving.load_model(loaded_file, safe_mode=True)
    np.testing.assert_allclose(
        loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5
    )


# ------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(images, policy):
    helpers.check_mixed_precision(
        lambda: Backbone(tiny_model(), pooling=None, output_dim=4), images, policy
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_named_model_follows_the_branch_policy(images32, policy):
    branch = Backbone(APP, dtype=policy)
    out = branch(images32)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    layers = [layer for layer in branch.backbone.layers if layer.weights]
    assert layers and all(layer.dtype_policy.name == policy for layer in layers)
    assert keras.backend.standardize_dtype(out.dtype) == keras.DTypePolicy(policy).compute_dtype
    assert all(keras.backend.standardize_dtype(v.dtype) == "float32" for v in branch.weights)
    assert np.all(np.isfinite(helpers.as_numpy(keras.ops.cast(out, "float32"))))


# ------------------------------------------------------------------ saving
@pytest.mark.parametrize("pooling", ["mean", None])
def test_save_and_load(images, tmp_path, pooling):
    helpers.check_saving(
        Backbone(tiny_model(), pooling=pooling, output_dim=3, trainable=False), images, tmp_path
    )


def test_save_and_load_named_model(images32, tmp_path):
    branch = Backbone(APP, pooling=None)
    loaded = helpers.check_saving(branch, images32, tmp_path, atol=1e-4)
    restored = loaded.get_layer(branch.name)
    assert isinstance(restored, Backbone) and restored.model == APP


@requires_tensorflow
def test_saved_model_export(images, tmp_path):
    helpers.check_saved_model(Backbone(tiny_model(), output_dim=3), images, tmp_path, atol=1e-4)


@requires_tensorflow
def test_saved_model_export_named_model(images, tmp_path):
    helpers.check_saved_model(Backbone("VGG16"), images, tmp_path, atol=1e-3)


# ------------------------------------------------------------------ bad arguments / inputs
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model": "ResNet5"}, r"Did you mean 'ResNet50'.*Received: model='ResNet5'"),
        ({"model": "mobilenetv3small"}, r"'MobileNetV3Small'.*model='mobilenetv3small'"),
        ({"model": "NoSuchNet"}, r"Received: model='NoSuchNet'"),
        ({"model": 50}, r"Received: model=50"),
        ({"model": keras.layers.Dense(3)}, r"Received: model=<Dense"),
        ({"weights": "imagenet21k"}, r"Received: weights='imagenet21k'"),
        ({"weights": "/no/such/file.weights.h5"}, r"Received: weights='/no/such/file"),
        ({"weights": 3}, r"Received: weights=3"),
        ({"input_size": 0}, r"Received: input_size=0"),
        ({"input_size": (32,)}, r"Received: input_size=\(32,\)"),
        ({"input_size": (32, 0)}, r"Received: input_size=\(32, 0\)"),
        ({"input_size": "big"}, r"Received: input_size='big'"),
        ({"input_size": 2.5}, r"Received: input_size=2\.5"),
        ({"input_size": 16}, r"at least 32 for ResNet50\. Received: input_size=16"),
        ({"model": "Xception", "input_size": 64}, r"at least 71.*input_size=64"),
        ({"pooling": "last"}, r"Received: pooling='last'"),
        ({"output_dim": 0}, r"Received: output_dim=0"),
        ({"trainable": "no"}, r"Received: trainable='no'"),
        ({"preprocess": 1}, r"Received: preprocess=1"),
        ({"vocab_size": 100}, r"Received: vocab_size=100"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Backbone(**kwargs)


def test_bad_user_model_arguments():
    with pytest.raises(ValueError, match=r"weights='imagenet'"):
        Backbone(tiny_model(), weights="imagenet")
    with pytest.raises(ValueError, match=r"Received: input_size=32"):
        Backbone(tiny_model(size=24), input_size=32)
    vectors = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"single image input"):
        Backbone(vectors)


def test_bad_inputs(images):
    with pytest.raises(ValueError, match=r"cannot take input"):
        Backbone(tiny_model())(images[:, :, :, 0])  # rank 3
    with pytest.raises(ValueError, match=r"cannot take input"):
        Backbone(tiny_model())(np.ones((4, 7), "float32"))
    with pytest.raises(ValueError, match=r"1 to 3 channels"):
        Backbone(APP)(np.ones((2, 32, 32, 4), "float32"))
    with pytest.raises(ValueError, match=r"1 to 3 channels"):
        Backbone(tiny_model())(keras.Input((16, 16, 5)))
    with pytest.raises(ValueError, match=r"input_size"):
        Backbone("NASNetMobile")(keras.Input((None, None, 3)))
    keras.backend.clear_session()


def test_built_branch_rejects_more_channels(images):
    branch = Backbone(tiny_model())
    branch(images[..., :1])  # grey images are repeated to 3 channels
    with pytest.raises(ValueError, match=r"1 to 3 channels"):
        branch(np.concatenate([images, images[..., :1]], axis=-1))


def test_save_and_load_mixed_float16(images, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    branch = Backbone(tiny_model(), pooling="max", output_dim=3)
    helpers.check_saving_mixed_float16(branch, images, tmp_path, atol=1e-2)
