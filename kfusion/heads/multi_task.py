import copy

import keras
import numpy as np
from keras import ops

from kfusion import _checks
from kfusion.heads._base import BaseHead


@keras.saving.register_keras_serializable(package="kfusion")
class MultiTask(keras.layers.Layer):
    """Several heads on the same fused features, one per task (hard parameter sharing).

    Every task's head reads the same features, so the branches and the fusion layer are
    shared by all tasks (hard parameter sharing, Caruana 1997, *Multitask Learning*):

        out[t] = head_t(x)                    for each task name t

    The total loss of a model built on it is the weighted sum of the task losses,
    `sum_t w_t L_t` with `loss_weights` (default 1 each), which keras computes from the
    loss dict returned by `default_loss()`. With `uncertainty_weighting=True` the weights
    are learned instead, from one log variance s_t per task (homoscedastic task
    uncertainty, Kendall, Gal and Cipolla 2018, *Multi-task learning using uncertainty to
    weigh losses*):

        loss = sum_t exp(-s_t) * w_t * L_t + s_t           (s_t trainable, 0 at first)

    so a task whose loss stays high (noisy, or on another scale) gets a smaller weight,
    and the `+ s_t` term keeps the weights from collapsing to 0. `FusionModel` computes it.

    Args:
        heads: dict mapping task names (valid Python identifiers) to kfusion heads
            (`Classification`, `MultiLabel`, `Regression`); at least one. Each head
            instance may appear once. Tasks are stored in sorted name order.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...). A `dtype`
            here is this layer's own; each task head keeps the policy it was made with
            (under a global mixed precision policy set first, all of them follow it).
        loss_weights: None or a dict task name -> weight (a number >= 0; tasks left out
            weigh 1): the weight of each task's loss. `FusionModel.compile` passes them
            to keras unless `compile(loss_weights=...)` is given.
        uncertainty_weighting: bool, learn the task weights (see above). Defaults to
            False.

    Call arguments:
        inputs: float tensor of shape `(batch, D)`.
        training: bool, whether the heads' dropout is active.

    Returns:
        A dict mapping each task name to its head's float32 output.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> head = kf.heads.MultiTask(
    ...     {"label": kf.heads.Classification(3), "score": kf.heads.Regression()}
    ... )
    >>> out = head(np.ones((4, 8), "float32"))
    >>> {name: tuple(y.shape) for name, y in out.items()}
    {'label': (4, 3), 'score': (4, 1)}
    >>> sorted(head.default_loss())
    ['label', 'score']
    """

    def __init__(self, heads, loss_weights=None, uncertainty_weighting=False, **kwargs):
        heads = _check_heads(heads)
        loss_weights = _check_loss_weights(loss_weights, heads)
        uncertainty_weighting = _checks.check_bool("uncertainty_weighting", uncertainty_weighting)
        super().__init__(**kwargs)
        self.heads = heads
        self.loss_weights = loss_weights
        self.uncertainty_weighting = uncertainty_weighting
        self.log_variances = None
        self.supports_masking = True
        if not self.trainable:
            # Sub-layers made after `Layer.__init__` do not inherit `trainable=False`;
            # the setter is called directly because `self.trainable = False` is a no-op
            # on TensorFlow when the value does not change.
            keras.layers.Layer.trainable.fset(self, False)

    def build(self, input_shape):
        for head in self.heads.values():
            # Heads restored by `from_config` may arrive built already.
            if not head.built:
                head.build(input_shape)
        if self.uncertainty_weighting:
            self.log_variances = self.add_weight(
                shape=(len(self.heads),),
                initializer="zeros",
                dtype="float32",
                autocast=False,
                name="log_variances",
            )
        self.built = True

    def call(self, inputs, training=None, mask=None):
        return {name: head(inputs, training=training) for name, head in self.heads.items()}

    def compute_output_shape(self, input_shape):
        return {name: head.compute_output_shape(input_shape) for name, head in self.heads.items()}

    def compute_output_spec(self, inputs, training=None, mask=None):
        return {name: head.compute_output_spec(inputs) for name, head in self.heads.items()}

    def compute_mask(self, inputs, mask=None):
        return None

    def default_loss(self):
        """A dict task name -> a fresh default loss of that task's head."""
        return {name: head.default_loss() for name, head in self.heads.items()}

    def default_loss_weights(self):
        """A dict task name -> loss weight (1 for tasks `loss_weights` leaves out)."""
        given = self.loss_weights or {}
        return {name: float(given.get(name, 1.0)) for name in self.heads}

    def task_weights(self):
        """The current weight of each task: `exp(-s_t) * w_t` (or `w_t` without learning)."""
        weights = self.default_loss_weights()
        if not self.uncertainty_weighting or self.log_variances is None:
            return weights
        s = np.asarray(ops.convert_to_numpy(self.log_variances), "float64")
        return {name: float(np.exp(-s[i]) * weights[name]) for i, name in enumerate(self.heads)}

    def weighted_loss(self, y, y_pred, sample_weight=None):
        """`sum_t exp(-s_t) w_t L_t + s_t` with the heads' own losses (uncertainty mode)."""
        weights = self.default_loss_weights()
        total = 0.0
        for i, (name, head) in enumerate(self.heads.items()):
            task = head.default_loss()(y[name], y_pred[name], sample_weight=sample_weight)
            s = self.log_variances[i]
            total = total + ops.exp(-s) * weights[name] * task + s
        return total

    def default_metrics(self):
        """A dict task name -> fresh default metrics (a list) of that task's head."""
        return {name: head.default_metrics() for name, head in self.heads.items()}

    def check_labels(self, y, name="y"):
        """Checks a dict of labels task by task with each task head's `check_labels`.

        The dict needs one entry per task; a NumPy array (one set of labels for several
        outputs) is refused. Other kinds of labels are left to keras.

        Args:
            y: the labels passed to `fit` or `evaluate`: a dict task name -> labels.
            name: how the error message names them.
        """
        if isinstance(y, np.ndarray):
            raise ValueError(
                f"The labels {name} for head '{self.name}' (MultiTask) must be a dict task "
                f"name -> labels with keys {list(self.heads)}. Received an array of shape "
                f"{y.shape}."
            )
        if isinstance(y, dict):
            if set(y) != set(self.heads):
                raise ValueError(
                    f"The labels {name} for head '{self.name}' (MultiTask) must have one "
                    f"entry per task: {list(self.heads)}. Received keys {sorted(map(str, y))}."
                )
            for task, labels in y.items():
                self.heads[task].check_labels(labels, f"{name}[{task!r}]")

    def get_config(self):
        return {
            **super().get_config(),
            "loss_weights": None if self.loss_weights is None else dict(self.loss_weights),
            "uncertainty_weighting": self.uncertainty_weighting,
            "heads": {
                name: keras.saving.serialize_keras_object(head) for name, head in self.heads.items()
            },
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # `deserialize_keras_object` consumes the dicts it reads: give it copies.
        config["heads"] = {
            name: keras.saving.deserialize_keras_object(copy.deepcopy(head))
            for name, head in config["heads"].items()
        }
        return cls(**config)


def _check_heads(heads):
    """Validates the `heads` argument; returns a plain dict in sorted task order."""
    problem = None
    if not isinstance(heads, dict) or not heads:
        problem = "a non-empty dict mapping task names to kfusion heads"
    else:
        names = list(heads)
        bad_names = [n for n in names if not isinstance(n, str) or not n.isidentifier()]
        bad_heads = [n for n in names if not isinstance(heads[n], BaseHead)]
        if bad_names:
            problem = f"keyed by valid identifiers; {bad_names!r} are not"
        elif bad_heads:
            problem = (
                "a dict whose values are kfusion heads (Classification, MultiLabel, "
                f"Regression); the value for {bad_heads!r} is not"
            )
        elif len({id(h) for h in heads.values()}) != len(heads):
            problem = "a dict of distinct head instances; one head appears twice"
    if problem is not None:
        raise ValueError(f"`heads` must be {problem}. Received: heads={heads!r}")
    return {name: heads[name] for name in sorted(heads)}


def _check_loss_weights(loss_weights, heads):
    """`loss_weights` as a dict task -> float, or None."""
    if loss_weights is None:
        return None
    if not isinstance(loss_weights, dict):
        raise ValueError(
            "`loss_weights` must be a dict task name -> weight. "
            f"Received: loss_weights={loss_weights!r}"
        )
    out = {}
    for task, weight in loss_weights.items():
        if task not in heads:
            raise ValueError(
                f"`loss_weights` names a task that does not exist. Received: loss_weights "
                f"key {task!r}; tasks are {list(heads)}."
            )
        _checks.check_non_negative_float(f"loss_weights[{task!r}]", weight)
        out[task] = float(weight)
    return out
