import contextlib
import copy
import difflib
import numbers
import os

import keras
from keras import ops

from kfusion import _checks
from kfusion.branches._base import BaseBranch

# Preprocessing of each `keras.applications` family (keyed by the application's module):
# "caffe": RGB -> BGR, minus the ImageNet BGR mean; "torch": /255, then ImageNet mean/std;
# "tf": /127.5 - 1; None: the application rescales/normalises inside the network.
_FAMILY_PREPROCESSING = {
    "resnet": "caffe",
    "vgg16": "caffe",
    "vgg19": "caffe",
    "densenet": "torch",
    "resnet_v2": "tf",
    "inception_v3": "tf",
    "inception_resnet_v2": "tf",
    "xception": "tf",
    "mobilenet": "tf",
    "mobilenet_v2": "tf",
    "nasnet": "tf",
    "efficientnet": None,
    "efficientnet_v2": None,
    "mobilenet_v3": None,
    "convnext": None,
}
# The smallest input side each family accepts (`keras.applications` checks these); 32 else.
_FAMILY_MIN_SIZE = {"xception": 71, "inception_v3": 75, "inception_resnet_v2": 75}
# Families whose graph is only valid for a static input size.
_STATIC_SIZE_FAMILIES = ("nasnet",)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def application_names():
    """The model names `Backbone` accepts: every application in `keras.applications`."""
    return sorted(
        name
        for name in dir(keras.applications)
        if name[:1].isupper() and callable(getattr(keras.applications, name))
    )


def application_family(name):
    """The `keras.applications` module an application comes from (e.g. "resnet")."""
    return getattr(keras.applications, name).__module__.rsplit(".", 1)[-1]


def preprocessing_mode(name):
    """The preprocessing mode of a `keras.applications` name: caffe, torch, tf or None."""
    return _FAMILY_PREPROCESSING.get(application_family(name))


def preprocess_images(x, mode):
    """The ImageNet preprocessing `mode` on RGB images in [0, 255], computed in float32.

    Matches `keras.applications.<family>.preprocess_input` for channels-last images.
    """
    x = ops.cast(x, "float32")
    if mode == "caffe":
        x = ops.flip(x, axis=-1)  # RGB -> BGR
        return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, "float32")
    if mode == "torch":
        mean = ops.convert_to_tensor(_TORCH_MEAN, "float32")
        std = ops.convert_to_tensor(_TORCH_STD, "float32")
        return (x / 255.0 - mean) / std
    if mode == "tf":
        return x / 127.5 - 1.0
    return x


@contextlib.contextmanager
def _global_dtype_policy(policy):
    """Sets the global dtype policy for the duration (applications take no `dtype`)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@keras.saving.register_keras_serializable(package="kfusion")
class Backbone(BaseBranch):
    """An image branch made of a `keras.applications` network or any image `keras.Model`.

    Transfer learning with a (pre)trained convolutional network as the feature extractor
    (Yosinski et al. 2014, *How transferable are features in deep neural networks?*;
    e.g. ResNet, He et al. 2016). For an image `x` with values in [0, 255]:

        x' = preprocess(resize(to_channels(x)))
        F  = backbone(x')                      (batch, H', W', C) feature map
        y  = pool(F)                           mean / max over the H' * W' positions
        y  = W y + b                           (output_dim given)

    - `to_channels`: a grey image is repeated to 3 channels; a 2-channel image gets a zero
      third channel (a user model with C_m input channels: repeated / zero-padded to C_m).
    - `resize`: `keras.layers.Resizing` (bilinear) to `input_size`; by default only images
      smaller than the application's minimum are enlarged (each short side to 32, 71 for
      Xception, 75 for InceptionV3 / InceptionResNetV2), and for a user model with a fixed
      input size images are resized to it. NASNet graphs need a static size: give
      `input_size` when the image size is unknown.
    - `preprocess`: reimplemented with `keras.ops` per family, assuming RGB in [0, 255]:
      "caffe" (VGG16/19, ResNet50/101/152: RGB->BGR, minus the ImageNet BGR mean),
      "torch" (DenseNet: /255, then ImageNet mean/std), "tf" (ResNetV2, Inception,
      Xception, MobileNet/V2, NASNet: /127.5 - 1); EfficientNet/V2, MobileNetV3 and
      ConvNeXt normalise inside the network (identity here). A user model gets its input
      unchanged. Preprocessing is computed in float32.

    A named application is created with `include_top=False`, the given `weights` and the
    input shape `(H, W, 3)` of the (resized) image when the branch is built, since that
    shape depends on the input. `trainable=False` freezes the whole branch (backbone and
    output projection) and runs the backbone in inference mode (BatchNormalization too),
    as Keras recommends for transfer learning; to fine-tune later set
    `branch.trainable = True` and compile again.

    `weights` only initialises the backbone: the weights then belong to the layer's state
    and are saved with the model, so `get_config()` records `weights=None` and loading a
    saved model never downloads weights or reads the original file.

    Args:
        model: the name of a `keras.applications` model ("ResNet50", "VGG16",
            "EfficientNetB0", "MobileNetV3Small", ...) or a functional / Sequential
            `keras.Model` with one image input `(H, W, C)`. Defaults to "ResNet50".
        weights: None (random initialisation), "imagenet" (named models only; downloads
            the ImageNet weights) or the path of a `.weights.h5` / `.h5` file saved from
            the same network (`model.save_weights`). Kept as `self.backbone_weights`
            (`self.weights` is the layer's list of variables).
        trainable: bool. False freezes the branch and runs the backbone in inference mode.
        input_size: None, an int (square) or `(height, width)`: the size images are
            resized to. None keeps the image size, enlarged to the model's minimum.
        pooling: "mean" or "max" over the feature map positions, or None to return the
            `(batch, H' * W', C)` positions as tokens.
        output_dim: int or None, width of a final linear projection (per position when
            `pooling=None`).
        preprocess: bool, whether to apply the family's preprocessing (named models).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: images `(batch, H, W, C)`, C in 1..3 (or up to the user model's channels),
            RGB values in [0, 255]; any real or integer dtype.
        training: bool, whether the backbone runs in training mode (ignored, i.e.
            inference mode, while the branch is frozen).

    Returns:
        `(batch, C)` (or `(batch, output_dim)`) with a pooling, else
        `(batch, H' * W', C)` tokens. A user model that already returns `(batch, D)`
        features is not pooled again.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import kfusion as kf
    >>> tiny = keras.Sequential(
    ...     [keras.Input((None, None, 3)), keras.layers.Conv2D(8, 3, strides=2)]
    ... )
    >>> branch = kf.branches.Backbone(tiny, pooling="max", output_dim=4)
    >>> tuple(branch(np.zeros((2, 16, 16, 1), "float32")).shape)
    (2, 4)
    >>> resnet = kf.branches.Backbone("ResNet50", weights=None, trainable=False)
    >>> resnet.model, resnet.pooling
    ('ResNet50', 'mean')
    """

    name_prefix = "backbone_branch"
    kinds = ("image",)
    poolings = ("mean", "max", None)

    def __init__(
        self,
        model="ResNet50",
        weights=None,
        trainable=True,
        input_size=None,
        pooling="mean",
        output_dim=None,
        preprocess=True,
        **kwargs,
    ):
        model = _check_model(model)
        weights = _check_weights(weights, model)
        trainable = _checks.check_bool("trainable", trainable)
        input_size = _check_input_size(input_size, model)
        preprocess = _checks.check_bool("preprocess", preprocess)
        super().__init__(pooling=pooling, output_dim=output_dim, trainable=trainable, **kwargs)
        self.model = model
        self.backbone_weights = weights
        self.input_size = input_size
        self.preprocess = preprocess
        self.preprocessing_mode = None
        # A named application is made in `build` (its input shape depends on the input).
        self.backbone = None
        if isinstance(model, str):
            if preprocess:
                self.preprocessing_mode = preprocessing_mode(model)
        else:
            self.backbone = model
            if weights is not None:
                self.backbone.load_weights(weights)
        self.resizing = None
        if input_size is not None:
            self.resizing = keras.layers.Resizing(
                *input_size, dtype=self.dtype_policy, name="resizing"
            )
        self._target = None
        self._freeze_if_needed()

    # ------------------------------------------------------------------ helpers
    def _freeze_if_needed(self):
        if not self.trainable:
            # Sub-layers made after `Layer.__init__` do not inherit `trainable=False`;
            # the setter is called directly because `self.trainable = False` is a no-op
            # on TensorFlow when the value does not change.
            keras.layers.Layer.trainable.fset(self, False)

    def _model_channels(self):
        if isinstance(self.model, str):
            return 3
        return self.model.inputs[0].shape[-1]

    def _target_size(self, shape):
        """The (height, width) images are given to the backbone (None where unknown)."""
        if self.input_size is not None:
            return self.input_size
        height, width = shape[1], shape[2]
        if isinstance(self.model, str):
            if height is None or width is None:
                return (height, width)
            least = _FAMILY_MIN_SIZE.get(application_family(self.model), 32)
            return (max(height, least), max(width, least))
        model_size = tuple(self.model.inputs[0].shape[1:3])
        if None not in model_size:
            return model_size
        return (height, width)

    def _check_image(self, shape):
        channels = shape[-1]
        wanted = self._model_channels()
        if wanted is not None and channels > wanted:
            raise ValueError(
                f"Backbone branch '{self.name}' takes images with 1 to {wanted} channels "
                f"for model {self._model_label()}. Received input shape {tuple(shape)}."
            )
        if isinstance(self.model, str) and self.input_size is None:
            family = application_family(self.model)
            if family in _STATIC_SIZE_FAMILIES and (shape[1] is None or shape[2] is None):
                raise ValueError(
                    f"{self.model} needs a static image size: pass `input_size` for images "
                    f"of unknown size. Received: input_size=None and input shape "
                    f"{tuple(shape)}."
                )

    def _model_label(self):
        return repr(self.model) if isinstance(self.model, str) else f"'{self.model.name}'"

    def _make_application(self, target):
        function = getattr(keras.applications, self.model)
        weights = "imagenet" if self.backbone_weights == "imagenet" else None
        with _global_dtype_policy(self.dtype_policy):
            network = function(include_top=False, weights=weights, input_shape=tuple(target) + (3,))
        if self.backbone_weights not in (None, "imagenet"):
            network.load_weights(self.backbone_weights)
        return network

    def _backbone_output_shape(self, target):
        shape = (None,) + tuple(target) + (self._model_channels(),)
        try:
            out = self.backbone.compute_output_shape(shape)
        except (NotImplementedError, AttributeError):
            out = self.backbone.compute_output_spec(keras.KerasTensor(shape)).shape
        out = tuple(out)
        if len(out) not in (2, 3, 4):
            raise ValueError(
                f"Backbone branch '{self.name}': model {self._model_label()} returns shape "
                f"{out}; expected a feature map (batch, H, W, C), tokens (batch, T, C) or "
                "features (batch, D)."
            )
        return out

    def _make_input_spec(self, kind, shape):
        # Images of 1 to C channels are all accepted (`_call_body` checks the count).
        return keras.InputSpec(ndim=4)

    # ------------------------------------------------------------ branch contract
    def _build_body(self, kind, shape):
        shape = tuple(shape)
        self._check_image(shape)
        target = self._target_size(shape)
        self._target = target
        if self.backbone is None:
            self.backbone = self._make_application(target)
        if self.resizing is None and target != shape[1:3]:
            self.resizing = keras.layers.Resizing(*target, dtype=self.dtype_policy, name="resizing")
        if self.resizing is not None:
            self.resizing.build(shape)
        self._backbone_output_shape(target)
        self._freeze_if_needed()

    def _call_body(self, x, mask, kind, training):
        self._check_image(tuple(x.shape))
        x = ops.cast(x, self.compute_dtype)
        channels, wanted = x.shape[-1], self._model_channels()
        if wanted is not None and channels != wanted:
            if channels == 1:
                x = ops.repeat(x, wanted, axis=-1)
            else:
                x = ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, wanted - channels]])
        if self.resizing is not None and tuple(x.shape[1:3]) != tuple(self._target):
            x = self.resizing(x)
        if self.preprocessing_mode is not None:
            x = ops.cast(preprocess_images(x, self.preprocessing_mode), self.compute_dtype)
        y = self.backbone(x, training=training if self.trainable else False)
        if len(y.shape) == 4:
            y = ops.reshape(y, (ops.shape(y)[0], -1, y.shape[-1]))
        return ops.cast(y, self.compute_dtype), None

    def _body_output_shape(self, kind, shape):
        shape = tuple(shape)
        if self.backbone is None:
            self.build(shape)
        out = self._backbone_output_shape(self._target_size(shape))
        if len(out) == 4:
            positions = None if None in out[1:3] else out[1] * out[2]
            return (shape[0], positions, out[-1])
        return (shape[0],) + tuple(out[1:])

    def _body_keeps_length(self, kind):
        return False

    # ------------------------------------------------------------------ keras API
    def get_config(self):
        model = self.model
        if not isinstance(model, str):
            model = keras.saving.serialize_keras_object(model)
        return {
            **super().get_config(),
            "model": model,
            "weights": None,  # weights are state, saved with the model (see the docstring)
            "input_size": None if self.input_size is None else list(self.input_size),
            "preprocess": self.preprocess,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("weights") is not None:
            # `get_config` always records None: the weights are in the saved model. A
            # config naming any (a download, a file) was not written by kfusion.
            raise ValueError(
                "A Backbone loaded from a config gets its weights from the saved model only; "
                "it never downloads them or reads a file the config names. Refused: "
                f"weights={config['weights']!r}"
            )
        if isinstance(config.get("model"), dict):
            # `deserialize_keras_object` consumes the dict it reads: give it a copy.
            model_config = copy.deepcopy(config["model"])
            config["model"] = keras.saving.deserialize_keras_object(model_config)
        return cls(**config)


# ---------------------------------------------------------------------- argument checks
def _check_model(model):
    if isinstance(model, keras.Model):
        inputs = getattr(model, "inputs", None) or []
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            shapes = [tuple(t.shape) for t in inputs]
            raise ValueError(
                "`model` must take a single image input (batch, H, W, C): a functional or "
                "Sequential model made with a `keras.Input`. "
                f"Received: model='{model.name}' with inputs of shapes {shapes}"
            )
        return model
    names = application_names()
    if isinstance(model, str) and model in names:
        return model
    hint = ""
    if isinstance(model, str):
        lowered = {n.lower(): n for n in names}
        close = difflib.get_close_matches(model.lower(), list(lowered), n=3, cutoff=0.6)
        if close:
            hint = f" Did you mean {', '.join(repr(lowered[c]) for c in close)}?"
    raise ValueError(
        "`model` must be the name of a keras.applications model (e.g. 'ResNet50', "
        f"'MobileNetV3Small') or a keras.Model.{hint} Received: model={model!r}"
    )


def _check_weights(weights, model):
    if weights is None:
        return None
    if weights == "imagenet":
        if not isinstance(model, str):
            raise ValueError(
                "`weights='imagenet'` needs a keras.applications name as `model`; a "
                "keras.Model brings its own weights. Received: weights='imagenet'"
            )
        return weights
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if isinstance(weights, str) and weights.endswith(".h5") and os.path.isfile(weights):
        return weights
    raise ValueError(
        "`weights` must be None, 'imagenet' or the path of an existing .weights.h5 file. "
        f"Received: weights={weights!r}"
    )


def _check_input_size(input_size, model):
    if input_size is None:
        return None
    size = input_size
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    ok = (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in size
        )
    )
    if not ok:
        raise ValueError(
            "`input_size` must be None, an integer >= 1 or a (height, width) pair of them. "
            f"Received: input_size={input_size!r}"
        )
    size = (int(size[0]), int(size[1]))
    if isinstance(model, str):
        least = _FAMILY_MIN_SIZE.get(application_family(model), 32)
        if min(size) < least:
            raise ValueError(
                f"`input_size` must be at least {least} for {model}. "
                f"Received: input_size={input_size!r}"
            )
    else:
        model_size = tuple(model.inputs[0].shape[1:3])
        if None not in model_size and model_size != size:
            raise ValueError(
                f"`input_size` must match the input size {model_size} of model "
                f"'{model.name}'. Received: input_size={input_size!r}"
            )
    return size
