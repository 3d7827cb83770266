import keras
from keras import ops

from kfusion import _checks
from kfusion.layers import _utils


@keras.saving.register_keras_serializable(package="kfusion")
class BranchDropout(keras.layers.Layer):
    """Drops whole branches' features at random in training, never all of them.

    For M branch features h_1..h_M and each sample, in training:

        k_m ~ Bernoulli(1 - rate)   (if every k_m = 0, one branch chosen at random is kept)
        h_m <- h_m * k_m * M / sum_j k_j

    so a sample sees a random non-empty subset of its branches, rescaled to the full
    set's magnitude (the inverted dropout of Srivastava et al. 2014, applied per branch:
    the "modality dropout" of Neverova et al. 2016, *ModDrop: adaptive multi-modal
    gesture recognition*). No branch can lean on another one being there, so each
    learns features that predict on their own, and the fused model behaves like an
    ensemble of its branches. At inference it is the identity.

    Args:
        rate: float in [0, 1), the chance that a branch is dropped for a sample.
        seed: int or None, the seed of the random draws.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a list of M >= 2 tensors `(batch, ...)` (vectors or sequences).
        training: bool, whether to drop.
        mask: optional list of masks; passed on unchanged.

    Returns:
        The list of tensors, same shapes.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> layer = kf.layers.BranchDropout(0.5, seed=0)
    >>> a, b = np.ones((64, 4), "float32"), np.ones((64, 4), "float32")
    >>> out = [np.asarray(t) for t in layer([a, b], training=True)]
    >>> kept = (out[0][:, 0] > 0).astype(int) + (out[1][:, 0] > 0).astype(int)
    >>> bool(kept.min() >= 1), sorted(set(np.round(out[0][:, 0], 3).tolist()))
    (True, [0.0, 1.0, 2.0])
    >>> [np.asarray(t).tolist() == a.tolist() for t in layer([a, b])]
    [True, True]
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = _checks.check_rate("rate", rate)
        if seed is not None:
            seed = _checks.check_int("seed", seed, minimum=0)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="seed_generator")
        self.supports_masking = True

    def build(self, input_shape):
        shapes = _utils.flatten_shapes(input_shape, self.name)
        self.input_spec = [keras.InputSpec(ndim=len(s)) for s in shapes]
        self.built = True

    def call(self, inputs, training=None, mask=None):
        inputs = list(inputs)
        if not training or self.rate == 0.0:
            return inputs
        count = len(inputs)
        batch = ops.shape(inputs[0])[0]
        draw = keras.random.uniform((batch, count), seed=self.seed_generator)
        keep = ops.cast(draw >= self.rate, "float32")
        # A sample that lost every branch keeps the one with the largest draw.
        rescue = ops.one_hot(ops.argmax(draw, axis=-1), count, dtype="float32")
        none_kept = ops.cast(ops.sum(keep, axis=-1, keepdims=True) == 0, "float32")
        keep = keep + none_kept * rescue
        scale = keep * (count / ops.sum(keep, axis=-1, keepdims=True))
        out = []
        for m, x in enumerate(inputs):
            factor = ops.cast(scale[:, m], x.dtype)
            factor = ops.reshape(factor, (-1,) + (1,) * (len(x.shape) - 1))
            out.append(x * factor)
        return out

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
