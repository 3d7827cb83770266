import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kfusion")
class GradientModulation(keras.layers.Layer):
    """Passes branch features through unchanged and scales each branch's gradient.

    On-the-fly gradient modulation (OGM, Peng et al. 2022, *Balanced multimodal learning
    via on-the-fly gradient modulation*): a fused model learns fastest from its easiest
    branch, which then dominates and leaves the others under-trained. Slowing the
    dominant branch's updates lets the others catch up. For branch features h_m and
    coefficients k_m (a non-trainable weight, 1 at first):

        forward:   out_m = h_m                       (exactly)
        backward:  d loss / d h_m = k_m * d loss / d out_m

    written as `stop_gradient(h) + k * (h - stop_gradient(h))` in `keras.ops`, so it works
    the same on every backend. `kf.callbacks.ModalityBalance` sets the coefficients from
    the branches' confidence during `fit` (`FusionModel(balance="ogm")` adds both).

    Args:
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        features: a list of M branch features (vectors or sequences).
        mask: optional list of masks; passed on unchanged.

    Returns:
        The list of features, unchanged in value.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> layer = kf.layers.GradientModulation()
    >>> a, b = np.ones((2, 3), "float32"), np.ones((2, 5), "float32")
    >>> [tuple(t.shape) for t in layer([a, b])]
    [(2, 3), (2, 5)]
    >>> _ = layer.coefficients.assign([0.5, 1.0])
    >>> np.asarray(layer.coefficients).tolist()
    [0.5, 1.0]
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.coefficients = None

    def build(self, features_shape):
        self.coefficients = self.add_weight(
            shape=(len(features_shape),),
            initializer="ones",
            trainable=False,
            dtype="float32",
            autocast=False,
            name="coefficients",
        )
        self.built = True

    def call(self, features, mask=None):
        out = []
        for m, h in enumerate(features):
            frozen = ops.stop_gradient(h)
            out.append(frozen + ops.cast(self.coefficients[m], h.dtype) * (h - frozen))
        return out

    def compute_output_spec(self, features, mask=None):
        return [keras.KerasTensor(h.shape, dtype=h.dtype) for h in features]

    def compute_mask(self, features, mask=None):
        return mask
