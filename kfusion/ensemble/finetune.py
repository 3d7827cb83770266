import keras

from kfusion import _checks
from kfusion.branches import Backbone


def _branch(model, branch_name):
    layers = getattr(model, "branch_layers", None)
    if layers is None:
        raise ValueError(
            "`model` must be a kfusion FusionModel (with named branches). "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
    for layer in layers:
        if layer.name == branch_name:
            return layer
    raise ValueError(
        f"Model {model.name!r} has no branch named {branch_name!r}. Known branches: "
        f"{[layer.name for layer in layers]}. Received: branch_name={branch_name!r}"
    )


def _set_trainable(layer, value):
    """Sets `trainable` on `layer` and on every layer inside it, however deep.

    The setter is called on each layer directly: on TensorFlow `layer.trainable = value`
    does not reach the sub-layers when the flag itself does not change (a nested model
    that is trainable already keeps a BatchNormalization frozen by an earlier call).
    """
    for sub in layer._flatten_layers(include_self=True, recursive=True):
        keras.layers.Layer.trainable.fset(sub, value)


def _batch_norms(layer):
    """Every BatchNormalization layer in `layer` (itself included), however deep."""
    return [
        sub
        for sub in layer._flatten_layers(include_self=True, recursive=True)
        if isinstance(sub, keras.layers.BatchNormalization)
    ]


def freeze(model, branch_name):
    """Freezes one branch of a FusionModel by name: its weights stop training.

    Sets `branch.trainable = False` (Keras transfer learning: a frozen layer's weights are
    not updated, and a frozen BatchNormalization, or a frozen `Backbone`, runs in
    inference mode). Call `model.compile(...)` again afterwards so training sees the
    change.

    Args:
        model: a `kf.FusionModel`.
        branch_name: the branch layer's name (`model.branch_layers`, e.g. "cnn_branch").

    Returns:
        The branch layer.

    Raises:
        ValueError: naming `branch_name` and the known branch names when no branch has
            that name.

    Example:

    >>> import keras
    >>> import kfusion as kf
    >>> model = kf.FusionModel(
    ...     inputs=keras.Input((8, 2)),
    ...     branches=[kf.branches.CNN(filters=(4,), name="cnn"), kf.branches.RNN(units=4)],
    ... )
    >>> kf.ensemble.freeze(model, "cnn").trainable
    False
    >>> sorted({w.path.split("/")[0] for w in model.trainable_weights})
    ['rnn_branch']
    """
    branch = _branch(model, branch_name)
    _set_trainable(branch, False)
    return branch


def unfreeze(model, branch_name, keep_batchnorm_frozen=True):
    """Unfreezes one branch of a FusionModel by name, for fine-tuning.

    Sets `branch.trainable = True`. With `keep_batchnorm_frozen=True` (the default, as
    Keras' fine-tuning guide recommends) every BatchNormalization layer inside the branch
    stays frozen, which in Keras 3 also keeps it in inference mode (moving statistics,
    no updates): a small fine-tuning batch would otherwise wreck statistics learned on a
    large dataset. Call `model.compile(...)` again (typically with a low learning rate)
    afterwards.

    Args:
        model: a `kf.FusionModel`.
        branch_name: the branch layer's name.
        keep_batchnorm_frozen: bool, keep the branch's BatchNormalization layers frozen
            and in inference mode.

    Returns:
        The branch layer.

    Raises:
        ValueError: naming `branch_name` and the known branch names when no branch has
            that name.

    Example:

    >>> import keras
    >>> import kfusion as kf
    >>> model = kf.FusionModel(
    ...     inputs=keras.Input((8, 2)),
    ...     branches=[kf.branches.CNN(filters=(4,), name="cnn", trainable=False)],
    ... )
    >>> kf.ensemble.unfreeze(model, "cnn").trainable
    True
    """
    keep_batchnorm_frozen = _checks.check_bool("keep_batchnorm_frozen", keep_batchnorm_frozen)
    branch = _branch(model, branch_name)
    _set_trainable(branch, True)
    if keep_batchnorm_frozen:
        for norm in _batch_norms(branch):
            norm.trainable = False
    return branch


class UnfreezeBackbone(keras.callbacks.Callback):
    """Unfreezes a FusionModel's `Backbone` branches after some epochs, at a low rate.

    The two-phase transfer-learning recipe of Keras' fine-tuning guide (Chollet 2020,
    *Transfer learning & fine-tuning*; Yosinski et al. 2014): first train the new layers
    on a frozen pretrained backbone, then unfreeze the backbone and train everything with
    a much lower learning rate. At the end of epoch `after_epochs` this callback:

    1. sets every `kf.branches.Backbone` branch of the model to `trainable=True`, keeping
       their BatchNormalization layers frozen, so they stay in inference mode;
    2. replaces the optimizer by a fresh one of the same kind and settings with
       `learning_rate` (a new optimizer is needed: the old one has no slots for the
       backbone's weights);
    3. rebuilds the train step (`make_train_function(force=True)`), so the remaining
       epochs of the same `fit` train the backbone too. Compiled loss and metrics stay.

    Use it on a model whose Backbone branches start frozen
    (`kf.branches.Backbone(..., trainable=False)`).

    Args:
        after_epochs: int >= 1, the number of epochs trained with frozen backbones.
        learning_rate: float > 0, the learning rate after unfreezing. Defaults to 1e-5.
        keep_batchnorm_frozen: bool, keep the backbones' BatchNormalization layers frozen
            and in inference mode. Defaults to True.

    Example:

    >>> import keras, numpy as np
    >>> import kfusion as kf
    >>> tiny = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)])
    >>> model = kf.FusionModel(
    ...     inputs=keras.Input((8, 8, 3)),
    ...     branches=[kf.branches.Backbone(tiny, trainable=False, preprocess=False)],
    ...     head=kf.heads.Classification(2),
    ... )
    >>> model.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> x, y = np.zeros((4, 8, 8, 3), "float32"), np.array([0, 1, 0, 1])
    >>> callback = kf.ensemble.UnfreezeBackbone(after_epochs=1, learning_rate=1e-5)
    >>> _ = model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    >>> callback.unfrozen, round(float(model.optimizer.learning_rate), 8)
    (['backbone_branch'], 1e-05)
    """

    def __init__(self, after_epochs=1, learning_rate=1e-5, keep_batchnorm_frozen=True):
        super().__init__()
        self.after_epochs = _checks.check_int("after_epochs", after_epochs)
        self.learning_rate = _checks.check_positive_float("learning_rate", learning_rate)
        self.keep_batchnorm_frozen = _checks.check_bool(
            "keep_batchnorm_frozen", keep_batchnorm_frozen
        )
        self.unfrozen = []

    def on_train_begin(self, logs=None):
        layers = getattr(self.model, "branch_layers", None)
        if layers is None:
            raise ValueError(
                f"UnfreezeBackbone needs a kfusion FusionModel. Received: model={self.model.name!r}"
            )
        if not any(isinstance(layer, Backbone) for layer in layers):
            raise ValueError(
                f"UnfreezeBackbone: model {self.model.name!r} has no Backbone branch. "
                f"Its branches: {[layer.name for layer in layers]}"
            )

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 != self.after_epochs:
            return
        model = self.model
        self.unfrozen = []
        for layer in model.branch_layers:
            if isinstance(layer, Backbone):
                unfreeze(model, layer.name, keep_batchnorm_frozen=self.keep_batchnorm_frozen)
                self.unfrozen.append(layer.name)
        model.optimizer = _fresh_optimizer(model.optimizer, self.learning_rate)
        model.optimizer.build(model.trainable_variables)
        model.make_train_function(force=True)


def _fresh_optimizer(optimizer, learning_rate):
    """A new optimizer like `optimizer` (class and settings) with `learning_rate`."""
    scale = None
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        scale = optimizer
        optimizer = optimizer.inner_optimizer
    config = optimizer.get_config()
    config["learning_rate"] = learning_rate
    fresh = type(optimizer).from_config(config)
    if scale is not None:
        fresh = keras.optimizers.LossScaleOptimizer(fresh)
    return fresh
