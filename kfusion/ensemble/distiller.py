import copy
import numbers

import keras
from keras import ops

from kfusion import _checks
from kfusion.ensemble import _common
from kfusion.models.fusion_model import restore_compiled_state


@keras.saving.register_keras_serializable(package="kfusion")
class Distiller(keras.Model):
    """Trains a small student model to match a large teacher (knowledge distillation).

    Knowledge distillation (Hinton, Vinyals & Dean 2015, *Distilling the Knowledge in a
    Neural Network*): the student learns from the labels and from the teacher's softened
    predictions. With `q^T = softmax(z / T)` for logits `z` at temperature `T`,

        loss = alpha * L_hard(y, student(x))
               + (1 - alpha) * T^2 * KL(q^T_teacher || q^T_student)

    `L_hard` is the student's ordinary loss (by default its kfusion head's
    `default_loss()`); the `T^2` factor keeps the soft term's gradients on the scale of
    the hard term's when `T` changes. Note that `alpha` weighs the *hard* term here (as in
    the Keras distillation example); Hinton et al.'s soft-target weight is `1 - alpha`.

    The defaults, `temperature=2.0` and `alpha=0.5`, come from a measurement on digits
    (8x8 images, 1,000 training rows; teacher: the average of three CNN + Transformer
    members, 0.96 test accuracy; student: a 5k-parameter 2-layer CNN, Adam 5e-3, batch
    64). After 60 epochs the distilled student scored 0.950 and 0.973 on the validation
    split for two seeds against 0.925 and 0.963 trained alone; `T=4, alpha=0.5` was
    about as good (0.953, 0.965) and `T=4, alpha=0.1` (nine tenths soft targets, close
    to the former defaults `T=3, alpha=0.1`) was worse (0.943).
    `benchmarks/accuracy_ensembles.py` reports the defaults over three seeds. Two
    caveats, measured in the same runs: distillation needs more epochs than plain
    training (after 15 epochs every distilled student was 0.01-0.07 below the student
    alone; its gain came after 30-60), and a student that already matches its teacher
    alone gains nothing (MLP students on flattened digits, 0.96-0.97 alone with a 0.966
    MLP teacher, scored 0.005-0.02 lower distilled). Distil from a teacher clearly
    better than the student, for longer than you would train the student alone.

    The teacher is frozen (`trainable=False`, set in place) and always runs with
    `training=False`. Everything is written with `keras.ops` (in `compute_loss`), so it
    trains on TensorFlow, JAX and PyTorch.

    Logits or probabilities: each model's output follows the ensemble convention. A
    `FusionModel`'s head says which (`Classification(..., from_logits=True)` outputs
    logits, the default outputs probabilities); any other model is taken to output
    probabilities, unless `from_logits` says otherwise. Probabilities are turned into
    log-probabilities safely (`log(clip(p, 1e-7, 1))`, equal to the logits up to a
    constant that the softmax removes), so both kinds give the same loss. Softmax
    outputs use one distribution per sample; sigmoid outputs (binary or multi-label)
    use one 2-class distribution `softmax([0, z] / T)` per unit, summed over the units.

    Train the Distiller with `compile` and `fit`; `distiller.student` is the trained
    model to save and export (the Distiller only wraps it for training).

    Args:
        teacher: a built `keras.Model` (trained), a classifier.
        student: a built `keras.Model`, not the teacher itself, with the teacher's inputs
            and output shape.
        temperature: float > 0, the softening temperature `T`. Defaults to 2.0.
        alpha: float in [0, 1], the weight of the hard-label loss (the soft targets
            get `1 - alpha`). Defaults to 0.5.
        from_logits: None (each FusionModel's head decides; other models output
            probabilities), or a bool for both models.
        **kwargs: `keras.Model` arguments (`name`, ...).

    Call arguments:
        inputs: the student's inputs.
        training: bool, whether the student runs in training mode.

    Returns:
        The student's predictions.

    Example:

    >>> import keras, numpy as np
    >>> import kfusion as kf
    >>> x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    >>> y = (x[:, 0] > 0).astype("int32")
    >>> def model(units):
    ...     return kf.FusionModel(
    ...         inputs=keras.Input((6,), name="x"),
    ...         branches=[kf.branches.MLP(units=units)],
    ...         head=kf.heads.Classification(2),
    ...     )
    >>> teacher = model((32, 32))
    >>> teacher.compile(optimizer="adam")
    >>> _ = teacher.fit(x, y, epochs=1, verbose=0)
    >>> distiller = kf.ensemble.Distiller(teacher, model((4,)), temperature=2.0, alpha=0.2)
    >>> distiller.compile(optimizer="adam")  # hard loss: the student head's default
    >>> _ = distiller.fit(x, y, epochs=1, verbose=0)
    >>> distiller.student.predict(x[:2], verbose=0).shape
    (2, 1)
    """

    def __init__(self, teacher, student, temperature=2.0, alpha=0.5, from_logits=None, **kwargs):
        teacher = _common.check_model("teacher", teacher)
        student = _common.check_model("student", student)
        temperature = _checks.check_positive_float("temperature", temperature)
        alpha = _check_alpha(alpha)
        from_logits = _common.check_from_logits(from_logits)
        if student is teacher:
            # The teacher is frozen, so a student that is the teacher would never train.
            raise ValueError(
                "`student` must be another model than `teacher` (the teacher is frozen). "
                f"Received: teacher={teacher.name!r}, student={student.name!r} (one model)"
            )
        _common.check_same_inputs([teacher, student], name="teacher and student")
        _common.single_output(teacher, name="teacher")
        _common.single_output(student, name="student")
        teacher_width = teacher.outputs[0].shape[-1]
        student_width = student.outputs[0].shape[-1]
        if teacher_width != student_width:
            raise ValueError(
                "`student` must return the teacher's output shape. Teacher "
                f"{teacher.name!r} returns (None, {teacher_width}), student "
                f"{student.name!r} returns (None, {student_width}). "
                f"Received: student={student.name!r}"
            )
        teacher_kind = _common.output_kind(teacher, from_logits)
        student_kind = _common.output_kind(student, from_logits)
        for role, model, kind in (
            ("teacher", teacher, teacher_kind),
            ("student", student, student_kind),
        ):
            if kind[0] == "values":
                raise ValueError(
                    f"`{role}` must be a classifier (distillation matches class "
                    f"probabilities); {model.name!r} has a Regression head. "
                    f"Received: {role}={model.name!r}"
                )
        if teacher_kind[1] != student_kind[1]:
            raise ValueError(
                f"`teacher` and `student` must both end in a softmax or both in sigmoids. "
                f"Teacher {teacher.name!r}: {teacher_kind[1]}, student "
                f"{student.name!r}: {student_kind[1]}. Received: student={student.name!r}"
            )
        super().__init__(**kwargs)
        self.teacher = teacher
        self.student = student
        self.temperature = temperature
        self.alpha = alpha
        self.from_logits = from_logits
        self.teacher_space, self.activation = teacher_kind
        self.student_space = student_kind[0]
        self.hard_loss = None
        teacher.trainable = False

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Configures training: `loss` is the hard-label loss `L_hard`.

        Args:
            optimizer: as in `keras.Model.compile`. Defaults to `"adam"`.
            loss: a keras loss (name, instance or function) for the labels and the
                student's outputs. None takes the student's kfusion head's
                `default_loss()`.
            metrics: metrics of the student's predictions; None takes the student's
                head's `default_metrics()` (none for other models).
            **kwargs: other `keras.Model.compile` arguments (`jit_compile`, ...).
        """
        head = getattr(self.student, "head", None)
        if loss is None:
            if head is None or not hasattr(head, "default_loss"):
                raise ValueError(
                    "`loss` (the hard-label loss) is needed for a student without a "
                    "kfusion head. Received: loss=None"
                )
            loss = head.default_loss()
        if metrics is None and head is not None and hasattr(head, "default_metrics"):
            metrics = head.default_metrics()
        self.hard_loss = _resolve_loss(loss)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def compile_from_config(self, config):
        """Restores the compiled state saved in a `.keras` file."""
        restore_compiled_state(self, config)

    def distillation_loss(self, teacher_pred, student_pred):
        """Per-sample `KL(q^T_teacher || q^T_student)` (float32, shape `(batch,)`)."""
        t = self.temperature
        log_q_teacher = _common.log_probabilities(
            teacher_pred, self.teacher_space, self.activation, t
        )
        log_q_student = _common.log_probabilities(
            student_pred, self.student_space, self.activation, t
        )
        kl = ops.exp(log_q_teacher) * (log_q_teacher - log_q_student)
        return ops.reshape(ops.sum(kl, axis=tuple(range(1, len(kl.shape)))), (-1,))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if self.hard_loss is None:
            raise ValueError("Call `compile()` before training the Distiller.")
        teacher_pred = ops.stop_gradient(self.teacher(x, training=False))
        hard = ops.cast(self.hard_loss(y, y_pred, sample_weight=sample_weight), "float32")
        soft = self.distillation_loss(teacher_pred, y_pred)
        if sample_weight is not None:
            soft = soft * ops.reshape(ops.cast(sample_weight, "float32"), (-1,))
        soft = ops.mean(soft)
        total = self.alpha * hard + (1.0 - self.alpha) * self.temperature**2 * soft
        for extra in self.student.losses:
            total = total + ops.cast(extra, "float32")
        return total

    def get_config(self):
        models = {}
        for key, model in (("teacher", self.teacher), ("student", self.student)):
            models[key] = keras.saving.serialize_keras_object(model)
            # Their own compile state plays no part: the Distiller's compile trains.
            models[key].pop("compile_config", None)
        return {
            "name": self.name,
            "trainable": self.trainable,
            **models,
            "temperature": self.temperature,
            "alpha": self.alpha,
            "from_logits": self.from_logits,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("teacher", "student"):
            config[key] = keras.saving.deserialize_keras_object(
                copy.deepcopy(config[key]), custom_objects=custom_objects
            )
        return cls(**config)


def _check_alpha(alpha):
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not 0.0 <= float(alpha) <= 1.0
    ):
        raise ValueError(f"`alpha` must be a float in [0, 1]. Received: alpha={alpha!r}")
    return float(alpha)


def _resolve_loss(loss):
    try:
        resolved = keras.losses.get(loss)
    except (ValueError, TypeError) as e:
        raise ValueError(f"`loss` must be a keras loss. Received: loss={loss!r}") from e
    if resolved is None:
        raise ValueError(f"`loss` must be a keras loss. Received: loss={loss!r}")
    if isinstance(resolved, keras.losses.Loss):
        return resolved
    return _FunctionLoss(resolved)


class _FunctionLoss(keras.losses.Loss):
    """A loss function `fn(y_true, y_pred) -> per-sample loss` as a keras Loss object."""

    def __init__(self, fn):
        super().__init__(name=getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)
