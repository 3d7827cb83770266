import math

import keras
import numpy as np

from kfusion import _checks


class ModalityBalance(keras.callbacks.Callback):
    """Slows the most confident branch's learning, epoch by epoch (OGM).

    The coefficient rule of on-the-fly gradient modulation (Peng et al. 2022), for a
    model built with `FusionModel(balance="ogm", aux_loss_weight=...)`. At the end of
    each epoch it reads each branch's confidence from its auxiliary head, c_m =
    exp(-mean auxiliary loss of branch m over the epoch) (for cross-entropy: the
    geometric mean of the probability given to the true class), and sets the branch's
    gradient coefficient (`kf.layers.GradientModulation`) for the next epoch:

        rho_m = c_m / mean_{j != m} c_j
        k_m   = 1 - tanh(alpha * (rho_m - 1))   if rho_m > 1,   else 1

    so a branch far ahead of the others learns slower and the others at full speed. The
    paper updates the coefficients every batch; here they change once an epoch, the
    point where every backend's training state is synchronised (the JAX trainer keeps
    it outside the variables within an epoch). The paper's gradient-noise term (GE) is
    not applied. `FusionModel.fit` adds this callback itself when the model balances
    and none is given.

    Args:
        alpha: float > 0, how strongly a leading branch is slowed. Defaults to 0.5.
        min_coefficient: float in (0, 1], the smallest coefficient. Defaults to 0.1.

    Example:

    >>> import keras, numpy as np
    >>> import kfusion as kf
    >>> model = kf.FusionModel(
    ...     inputs={"a": keras.Input((4,)), "b": keras.Input((4,))},
    ...     branches={"a": kf.branches.MLP(units=(8,)), "b": kf.branches.MLP(units=(8,))},
    ...     head=kf.heads.Classification(2),
    ...     aux_loss_weight=0.5,
    ...     balance="ogm",
    ... )
    >>> model.compile(optimizer="adam")
    >>> x = {"a": np.random.rand(32, 4), "b": np.random.rand(32, 4)}
    >>> y = (x["a"][:, 0] > 0.5).astype("int32")
    >>> history = model.fit(x, y, epochs=2, verbose=0)
    >>> len(model.get_layer("gradient_modulation").coefficients.numpy())
    2
    """

    def __init__(self, alpha=0.5, min_coefficient=0.1):
        super().__init__()
        self.alpha = _checks.check_positive_float("alpha", alpha)
        if (
            isinstance(min_coefficient, bool)
            or not isinstance(min_coefficient, (int, float))
            or not 0.0 < float(min_coefficient) <= 1.0
        ):
            raise ValueError(
                "`min_coefficient` must be a float in (0, 1]. "
                f"Received: min_coefficient={min_coefficient!r}"
            )
        self.min_coefficient = float(min_coefficient)
        self.history = []  # [(epoch, confidences, coefficients)]

    def coefficients_for(self, confidences):
        """The coefficients `k_m` for the branch confidences `c_m` (a list)."""
        c = np.asarray(confidences, dtype="float64")
        out = []
        for m in range(len(c)):
            others = np.delete(c, m)
            rho = c[m] / max(float(others.mean()), 1e-12)
            k = 1.0 - math.tanh(self.alpha * (rho - 1.0)) if rho > 1.0 else 1.0
            out.append(max(k, self.min_coefficient))
        return out

    def on_epoch_end(self, epoch, logs=None):
        model = self.model
        layer = model.get_layer("gradient_modulation")
        names = model.get_layer("auxiliary_heads").branch_names
        logs = logs or {}
        keys = [f"aux_{n}_loss" for n in names]
        if not all(k in logs for k in keys):
            return
        confidences = [math.exp(-float(logs[k])) for k in keys]
        coefficients = self.coefficients_for(confidences)
        layer.coefficients.assign(np.asarray(coefficients, "float32"))
        self.history.append((epoch, confidences, coefficients))
