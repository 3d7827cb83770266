import copy

import keras
from keras import ops

from kfusion.layers import _utils


@keras.saving.register_keras_serializable(package="kfusion")
class AuxiliaryHeads(keras.layers.Layer):
    """One auxiliary head per branch, for a loss on each branch's own predictions.

    Loss fusion: a fused model trained on its fused head alone lets the branches that
    help least drift, and the fused head leans on the easiest one. An auxiliary head on
    each branch's features, trained jointly with the fused head, gives every branch a
    gradient of its own (deep supervision; in multimodal fusion the "unimodal losses" of
    Wang, Tran and Feiszli 2020, *What makes training multi-modal classification
    networks hard?*):

        loss = loss(y, head(fuse(h_1..h_M))) + weight * sum_m loss(y, head_m(h_m))

    The layer sits on the fused features on their way to the head and passes them
    through unchanged. In training it also computes `head_m(h_m)` for each branch and
    keeps them for the model's loss (`FusionModel(aux_loss_weight=...)` adds them); at
    inference it computes nothing, so `predict` and every export cost what they cost
    without it. `branch_predictions(features)` gives the auxiliary predictions on demand
    (`FusionModel.branch_predictions`, `kfusion.inspect`).

    Args:
        head: a kfusion head (`Classification`, `MultiLabel`, `Regression`): each
            auxiliary head is a fresh copy of its config (its own weights).
        branch_names: list of M strings, the branches' names (the heads are named
            `aux_<branch>`).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        fused: the fused features `(batch, D)`: returned unchanged.
        features: a list of M branch features, `(batch, d_m)` or `(batch, T_m, d_m)`
            (sequences are mean-pooled over their valid steps first).
        presence: optional `(batch, M)` presence of each branch (1 present), which
            weights each sample's auxiliary losses (an absent branch has nothing to
            predict from).
        training: bool; the auxiliary predictions are computed only in training.
        mask: the masks of `features` (passed by keras).

    Returns:
        `fused`, unchanged.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> layer = kf.layers.AuxiliaryHeads(kf.heads.Classification(3), ["cnn", "mlp"])
    >>> fused = np.ones((2, 8), "float32")
    >>> features = [np.ones((2, 4), "float32"), np.ones((2, 6), "float32")]
    >>> bool((np.asarray(layer(fused, features)) == fused).all())
    True
    >>> [tuple(p.shape) for p in layer.branch_predictions(features)]
    [(2, 3), (2, 3)]
    """

    def __init__(self, head, branch_names, **kwargs):
        super().__init__(**kwargs)
        if isinstance(head, dict):
            head = keras.saving.deserialize_keras_object(copy.deepcopy(head))
        if not callable(getattr(head, "default_loss", None)) or hasattr(head, "heads"):
            raise ValueError(
                "`head` must be a single-task kfusion head (Classification, MultiLabel, "
                f"Regression). Received: head={head!r}"
            )
        if (
            not isinstance(branch_names, (list, tuple))
            or not branch_names
            or not all(isinstance(n, str) and n for n in branch_names)
        ):
            raise ValueError(
                "`branch_names` must be a non-empty list of branch names. "
                f"Received: branch_names={branch_names!r}"
            )
        # The head's config only: the template itself is not a sub-layer (no weights).
        self.head_config = keras.saving.serialize_keras_object(head)
        self.branch_names = list(branch_names)
        config = head.get_config()
        self.heads = []
        for name in self.branch_names:
            conf = {**config, "name": f"aux_{name}"}
            self.heads.append(type(head).from_config(conf))
        self.supports_masking = True
        # The auxiliary predictions of the last training call (not tracked, not saved).
        object.__setattr__(self, "_last", None)

    def build(self, fused_shape, features_shape=None, presence_shape=None):
        if features_shape is not None:
            if len(features_shape) != len(self.heads):
                raise ValueError(
                    f"{self.name} was made for {len(self.heads)} branches; received "
                    f"{len(features_shape)} features."
                )
            for head, shape in zip(self.heads, features_shape):
                head.build((shape[0], shape[-1]))
        self.built = True

    def branch_predictions(self, features, mask=None, training=False):
        """Each auxiliary head's predictions on its branch's features (a list)."""
        masks = _utils.flatten_masks(mask, len(features)) if mask is not None else None
        out = []
        for m, (head, h) in enumerate(zip(self.heads, features)):
            if len(h.shape) == 3:
                h = _utils.masked_mean(h, None if masks is None else masks[m])
            out.append(head(h, training=training))
        return out

    def call(self, fused, features, presence=None, training=None, mask=None):
        if training:
            outputs = self.branch_predictions(features, mask=mask, training=True)
            weights = None if presence is None else ops.cast(presence, "float32")
            object.__setattr__(self, "_last", (outputs, weights))
        else:
            object.__setattr__(self, "_last", None)
        return fused

    def compute_output_spec(self, fused, features, presence=None, training=None, mask=None):
        return keras.KerasTensor(fused.shape, dtype=fused.dtype)

    def compute_mask(self, fused, features, presence=None, mask=None):
        return None

    def losses_for(self, y, sample_weight=None):
        """The auxiliary losses `[loss_m(y, head_m(h_m))]` of the last training call."""
        if self._last is None:
            return []
        outputs, presence = self._last
        out = []
        for m, (head, pred) in enumerate(zip(self.heads, outputs)):
            weight = sample_weight
            if presence is not None:
                weight = presence[:, m] if weight is None else presence[:, m] * weight
            out.append(head.default_loss()(y, pred, sample_weight=weight))
        return out

    def get_config(self):
        return {
            **super().get_config(),
            "head": copy.deepcopy(self.head_config),
            "branch_names": list(self.branch_names),
        }
