import numbers

import keras
from keras import ops

from kfusion import _checks


@keras.saving.register_keras_serializable(package="kfusion")
class MissingModalities(keras.layers.Layer):
    """Replaces the features of absent modalities by learned "missing" embeddings.

    A model with K inputs (modalities) and M branch features h_1..h_M, branch m reading
    modality k(m), takes one presence flag per modality and sample, p_k in {0, 1}. Then

        h_m <- h_m        if p_k(m) = 1
        h_m <- e_m        if p_k(m) = 0     (e_m a learned vector of h_m's width,
                                             the same at every step of a sequence)

    so an absent modality's values never reach the fusion layer: changing them changes
    no output. The layer also returns the branches' presence `(batch, M)`, which the
    fusion layers that weight branches (attention, gated, weighted sum) and
    cross-attention take as `presence=` to leave absent branches out of the weighting
    (their weights renormalised over the present ones; cross-attention: their tokens
    masked as keys). The sequence mask of an absent branch becomes all-True.

    Modality dropout (Neverova et al. 2016, *ModDrop*): in training, each present
    modality of each sample is made absent with its rate, through the same flags, so
    the missing embeddings are learned and every branch learns to predict without the
    others. A sample never loses its last present modality to dropout (one chosen at
    random among its present ones is kept). At inference the flags pass unchanged. A
    sample whose flags mark every modality absent is fused from the missing embeddings
    alone: one fixed answer, the same for every such sample.

    Args:
        modalities: list of M ints, for each branch feature the index of the modality
            (input, 0..K-1) it reads. Every modality needs a branch.
        rates: float in [0, 1), or a list of K of them: the modality dropout rate of
            each modality. Defaults to 0 (off).
        seed: int or None, the seed of the dropout draws.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        features: a list of M tensors `(batch, d_m)` or `(batch, T_m, d_m)`.
        presence: a list of K tensors `(batch,)`, bool or 0/1 numbers: True where the
            sample has that modality.
        training: bool, whether modality dropout is active.
        mask: optional list of M sequence masks (or None); passed on, all-True where
            the branch's modality is absent.

    Returns:
        `(features, branch_presence)`: the list of M tensors, same shapes, and a float32
        tensor `(batch, M)`, 1 where branch m's modality is present.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> layer = kf.layers.MissingModalities(modalities=[0, 1])
    >>> a, b = np.ones((2, 3), "float32"), np.full((2, 4), 5.0, "float32")
    >>> present = [np.array([True, False]), np.array([True, True])]
    >>> (fa, fb), branch_presence = layer([a, b], present)
    >>> np.asarray(fa).tolist()  # the absent row holds the missing embedding (zeros at first)
    [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    >>> np.asarray(branch_presence).tolist()
    [[1.0, 1.0], [0.0, 1.0]]
    """

    def __init__(self, modalities, rates=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if (
            not isinstance(modalities, (list, tuple))
            or len(modalities) < 1
            or not all(
                isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 0
                for k in modalities
            )
        ):
            raise ValueError(
                "`modalities` must be a non-empty list of modality indices (ints >= 0), "
                f"one per branch feature. Received: modalities={modalities!r}"
            )
        self.modalities = [int(k) for k in modalities]
        count = max(self.modalities) + 1
        unused = sorted(set(range(count)) - set(self.modalities))
        if unused:
            raise ValueError(
                f"`modalities` must name every modality 0..{count - 1} at least once; "
                f"{unused} has no branch. Received: modalities={modalities!r}"
            )
        self.num_modalities = count
        if isinstance(rates, (list, tuple)):
            if len(rates) != count:
                raise ValueError(
                    f"`rates` must be one rate or a list of {count} (one per modality). "
                    f"Received: rates={rates!r}"
                )
            rates = [_checks.check_rate("rates", r) for r in rates]
        else:
            rates = [_checks.check_rate("rates", rates)] * count
        self.rates = rates
        if seed is not None:
            seed = _checks.check_int("seed", seed, minimum=0)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")
        self.supports_masking = True
        self.embeddings = []

    def build(self, features_shape, presence_shape=None):
        shapes = list(features_shape)
        if len(shapes) != len(self.modalities):
            raise ValueError(
                f"{self.name} was made for {len(self.modalities)} branch features "
                f"(`modalities`={self.modalities}); received {len(shapes)}."
            )
        self.embeddings = [
            self.add_weight(
                shape=(int(shape[-1]),), initializer="zeros", name=f"missing_embedding_{m}"
            )
            for m, shape in enumerate(shapes)
        ]
        self.built = True

    def _presence(self, presence, training):
        """`(batch, K)` float32 presence, after modality dropout in training."""
        if len(presence) != self.num_modalities:
            raise ValueError(
                f"{self.name} needs one presence tensor per modality ({self.num_modalities}); "
                f"received {len(presence)}."
            )
        flags = ops.stack(
            [ops.cast(ops.reshape(p, (-1,)), "bool") for p in presence], axis=-1
        )  # (batch, K)
        if not training or not any(r > 0.0 for r in self.rates):
            return ops.cast(flags, "float32")
        draw = keras.random.uniform(ops.shape(flags), seed=self.seed_generator)
        keep = ops.logical_and(flags, draw >= ops.convert_to_tensor(self.rates, "float32"))
        # A sample that lost every present modality keeps its present one with the
        # largest draw (samples with none present stay that way).
        ranked = ops.where(flags, draw, -1.0)
        rescue = ops.cast(ops.one_hot(ops.argmax(ranked, axis=-1), self.num_modalities), "bool")
        none_kept = ops.logical_not(ops.any(keep, axis=-1, keepdims=True))
        keep = ops.logical_or(keep, ops.logical_and(none_kept, ops.logical_and(rescue, flags)))
        return ops.cast(keep, "float32")

    def call(self, features, presence, training=None, mask=None):
        modality = self._presence(list(presence), training)
        branch = ops.stack([modality[:, k] for k in self.modalities], axis=-1)  # (batch, M)
        out = []
        for m, h in enumerate(features):
            present = ops.cast(branch[:, m], "bool")
            present = ops.reshape(present, (-1,) + (1,) * (len(h.shape) - 1))
            embedding = ops.cast(self.embeddings[m], h.dtype)
            out.append(ops.where(present, h, ops.zeros_like(h) + embedding))
        return out, branch

    def compute_mask(self, features, presence, mask=None):
        if mask is None:
            return None, None
        masks = list(mask) if isinstance(mask, (list, tuple)) else [mask]
        if all(m is None for m in masks):
            return [None] * len(features), None
        flags = [ops.cast(ops.reshape(p, (-1, 1)), "bool") for p in presence]
        out = []
        for m, k in zip(masks, self.modalities):
            out.append(
                None
                if m is None
                else ops.logical_or(ops.cast(m, "bool"), ops.logical_not(flags[k]))
            )
        return out, None

    def compute_output_spec(self, features, presence, training=None, mask=None):
        out = [keras.KerasTensor(h.shape, dtype=h.dtype) for h in features]
        batch = features[0].shape[0]
        return out, keras.KerasTensor((batch, len(self.modalities)), dtype="float32")

    def get_config(self):
        return {
            **super().get_config(),
            "modalities": list(self.modalities),
            "rates": list(self.rates),
            "seed": self.seed,
        }
