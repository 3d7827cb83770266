import functools

import keras
from keras import ops

from kfusion import _checks, _quantization
from kfusion.layers import _utils

# Which attention path kfusion's attention layers take: None (each backend's default, see
# `_fused_by_default`), "explicit" (einsum logits, float32 masked softmax) or "fused"
# (`ops.dot_product_attention` wherever it applies). Benchmarks and tests set it to compare
# the two.
_ATTENTION_PATH = None


def _use_fused_attention(layer, query, training, return_attention_scores):
    """Whether a `MultiHeadAttention` call uses `_fused_attention`.

    Only when no dropout is applied to the attention weights in this call
    (rate 0, or not training) and the weights are not returned. Never for
    float16 queries on JAX's CPU: its `dot_product_attention` asks XLA for a
    float16 x float16 -> float32 product, which compiled CPU code lacks.
    """
    if _ATTENTION_PATH == "explicit" or return_attention_scores:
        return False
    if layer._dropout > 0.0 and training:
        return False
    if keras.backend.standardize_dtype(query.dtype) == "float16" and _jax_on_cpu():
        return False
    return _ATTENTION_PATH == "fused" or _fused_by_default()


@functools.cache
def _jax_on_cpu():
    if keras.backend.backend() != "jax":
        return False
    return keras.distribution.list_devices()[0].startswith("cpu")


@functools.cache
def _fused_by_default():
    """Whether this backend has a fused attention kernel for `_fused_attention` to reach.

    PyTorch: yes (`scaled_dot_product_attention` picks a flash or memory-efficient
    kernel, on CPU too). JAX: on GPU and TPU (cuDNN flash attention, Splash
    attention); on CPU its `dot_product_attention` is the explicit computation
    with a `(B, N, T, S)` mask materialized, which measured slower and larger
    (benchmarks/attention_memory.py). TensorFlow: no, keras' TensorFlow
    `dot_product_attention` is that same explicit computation.
    """
    backend = keras.backend.backend()
    return backend == "torch" or (backend == "jax" and not _jax_on_cpu())


def _fused_attention(query, key, value, attention_mask, scale):
    """Masked attention through `keras.ops.dot_product_attention`.

    Args:
        query: `(B, T, N, H)` tensor.
        key: `(B, S, N, H)` tensor.
        value: `(B, S, N, H)` tensor.
        attention_mask: None or a bool tensor broadcastable to `(B, T, S)`
            (e.g. `(B, 1, S)` for a key padding mask), True where a query may
            attend a key.
        scale: float multiplying the logits.

    Returns:
        `(B, T, N, H)` tensor. A query row whose keys are all masked gets
        exactly zero output (the explicit path's all-zero weights), never NaN
        or an average: the fused call sees that row unmasked and its output is
        zeroed afterwards.
    """
    mask = valid = None
    if attention_mask is not None:
        mask = ops.cast(attention_mask, "bool")
        valid = ops.any(mask, axis=-1, keepdims=True)  # (B, T or 1, 1)
        mask = ops.expand_dims(ops.logical_or(mask, ops.logical_not(valid)), axis=1)
    output = ops.dot_product_attention(query, key, value, mask=mask, scale=float(scale))
    if valid is not None:
        output = ops.where(ops.expand_dims(valid, -1), output, ops.zeros_like(output))
    return output


class _Float32SoftmaxAttention(keras.layers.MultiHeadAttention):
    """`MultiHeadAttention` whose scores and softmax are computed in float32.

    Overrides `_compute_attention`, the hook keras documents for custom
    attention. Query and key are cast to float32 before their dot product, the
    mask is applied and the softmax taken in float32, and the probabilities
    are cast back to the value's dtype (the compute dtype) for the weighted
    sum. Masked positions get probability 0, so a fully masked row (a padded
    query) gives a zero attention output instead of NaN or a uniform average.
    Private: it is created by `TransformerBlock` and never serialized alone.

    Without active attention dropout and without returned scores (inference,
    or training with `dropout=0`), on backends with a fused attention kernel
    (`_fused_by_default`), the output is computed by `_fused_attention`
    (`ops.dot_product_attention`) with the same masking and fully-masked-row
    rule.
    """

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        **kwargs,
    ):
        if getattr(self, "rotary", False):
            query, key = _utils.rotary(query), _utils.rotary(key)
        if _use_fused_attention(self, query, training, return_attention_scores):
            output = _fused_attention(
                query, key, value, attention_mask, scale=self._inverse_sqrt_key_dim
            )
            return output, None
        query = ops.cast(query, "float32") * self._inverse_sqrt_key_dim
        scores = ops.einsum(self._dot_product_equation, ops.cast(key, "float32"), query)
        if attention_mask is not None:
            attention_mask = ops.cast(attention_mask, "bool")
            expand_axis = -len(self._attention_axes) * 2 - 1
            for _ in range(len(scores.shape) - len(attention_mask.shape)):
                attention_mask = ops.expand_dims(attention_mask, axis=expand_axis)
            scores = ops.where(attention_mask, scores, -1e9)
        if scores.shape[-1] == 1:
            # One key (T = 1): the softmax is 1 (keras would warn about a size-1 softmax).
            probs = ops.ones_like(scores)
        else:
            probs = _utils.softmax_float32(scores, axis=-1)
        if attention_mask is not None:
            probs = ops.where(attention_mask, probs, 0.0)
        dropped = probs
        if self._dropout > 0.0:
            dropped = self._dropout_layer(probs, training=training)
        output = ops.einsum(self._combine_equation, ops.cast(dropped, value.dtype), value)
        return output, probs


@keras.saving.register_keras_serializable(package="kfusion")
class TransformerBlock(keras.layers.Layer):
    """A Transformer encoder block: self-attention and feed-forward, with residuals.

    The encoder layer of Vaswani et al. 2017, *Attention Is All You Need*,
    in the pre-norm arrangement of Xiong et al. 2020, *On Layer
    Normalization in the Transformer Architecture* (`norm_first=True`) or the
    original post-norm one (`norm_first=False`):

        pre-norm:   x = x + drop(MHA(LN(x), mask))
                    x = x + drop(W_2 act(W_1 LN(x) + b_1) + b_2)
        post-norm:  x = LN(x + drop(MHA(x, mask)))
                    x = LN(x + drop(W_2 act(W_1 x + b_1) + b_2))

    with `MHA(q)_i = W_o concat_h(sum_j softmax_j(q_i^h . k_j^h / sqrt(key_dim)) v_j^h)`.
    Padded keys are never attended, so the outputs at real positions do not
    depend on how much padding follows them. The same `dropout` rate is used
    on the attention probabilities and on both sub-layer outputs. A pre-norm
    stack usually ends with one more `LayerNormalization`.

    Under mixed precision the attention scores, the softmax and the layer
    normalisation statistics are computed in float32; the output is in the
    policy's compute dtype.

    Without attention dropout in a call (inference, or `dropout=0`) the
    attention runs through `keras.ops.dot_product_attention` on PyTorch and
    on JAX off CPU, reaching their fused kernels (PyTorch's flash-attention
    kernel keeps memory O(T) instead of O(T^2), on CPU too); otherwise, and
    on TensorFlow (keras has no fused TensorFlow kernel), it is written out.
    Both give the same result; a sample whose steps are all padding gets
    all-zero attention weights (never NaN) on either path.

    Args:
        num_heads: int >= 1. Number of attention heads.
        intermediate_dim: int >= 1. Width of the feed-forward hidden layer.
        key_dim: int >= 1 or None. Size of each head's query/key/value.
            Defaults to `d // num_heads` (`d` is the input width).
        dropout: float in [0, 1). Dropout rate (attention probabilities,
            attention output, feed-forward output).
        activation: activation of the feed-forward hidden layer (name or
            callable). Defaults to `"gelu"`.
        norm_first: bool. `True` for pre-norm (Xiong et al. 2020), `False`
            for post-norm (Vaswani et al. 2017).
        layer_norm_epsilon: float > 0. Epsilon of both layer normalisations.
        rotary: bool. Whether queries and keys get rotary position embeddings
            (RoFormer, Su et al. 2021) before their dot product, so attention
            depends on the distance between steps and needs no position table.
            Needs an even `key_dim`. Defaults to False.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a tensor of shape `(batch, T, d)`; `T` may be unknown.
        padding_mask: optional bool or int tensor of shape `(batch, T)`, 1
            (True) for real tokens and 0 for padding. When None, the keras
            mask of `inputs` is used, if any.
        training: bool, whether dropout is active.
        mask: the keras mask of `inputs` (passed by keras).

    Returns:
        A tensor of shape `(batch, T, d)`. The input mask is passed on.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32")
    >>> block = kf.layers.TransformerBlock(num_heads=2, intermediate_dim=16)
    >>> tuple(block(x).shape)
    (2, 5, 8)
    >>> padding_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    >>> tuple(block(x, padding_mask=padding_mask).shape)
    (2, 5, 8)
    """

    def __init__(
        self,
        num_heads,
        intermediate_dim,
        key_dim=None,
        dropout=0.0,
        activation="gelu",
        norm_first=True,
        layer_norm_epsilon=1e-6,
        rotary=False,
        **kwargs,
    ):
        num_heads = _checks.check_int("num_heads", num_heads)
        intermediate_dim = _checks.check_int("intermediate_dim", intermediate_dim)
        key_dim = _checks.check_int("key_dim", key_dim, allow_none=True)
        dropout = _checks.check_rate("dropout", dropout)
        activation = _checks.check_activation("activation", activation)
        norm_first = _checks.check_bool("norm_first", norm_first)
        layer_norm_epsilon = _checks.check_positive_float("layer_norm_epsilon", layer_norm_epsilon)
        rotary = _checks.check_bool("rotary", rotary)
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.key_dim = key_dim
        self.dropout = dropout
        self.activation = activation
        self.norm_first = norm_first
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rotary = rotary
        self.supports_masking = True

        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="attention_norm"
        )
        self.attention_dropout = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="attention_dropout"
        )
        self.feedforward_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="feedforward_norm"
        )
        self.intermediate_dense = keras.layers.Dense(
            self.intermediate_dim,
            activation=self.activation,
            dtype=self.dtype_policy,
            name="intermediate_dense",
        )
        self.feedforward_dropout = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="feedforward_dropout"
        )
        # The attention and the feed-forward output projection need the input
        # width `d` (and the default key_dim = d // num_heads), so `build`
        # creates them.
        self.attention = None
        self.output_dense = None

    def build(self, input_shape):
        name = self.__class__.__name__
        input_shape = tuple(input_shape)
        _utils.check_ranks([input_shape], name, {3})
        dim = input_shape[-1]
        self.input_spec = keras.InputSpec(ndim=3, axes={-1: dim})
        key_dim = self.key_dim if self.key_dim is not None else dim // self.num_heads
        if key_dim < 1:
            raise ValueError(
                f"{name} with key_dim=None needs an input width d >= num_heads "
                f"(key_dim = d // num_heads). Received: d={dim}, num_heads={self.num_heads}"
            )
        if self.rotary and key_dim % 2:
            raise ValueError(
                f"{name} with rotary=True needs an even key_dim (features are rotated in "
                f"pairs). Received: key_dim={key_dim}"
            )
        self.attention = _Float32SoftmaxAttention(
            num_heads=self.num_heads,
            key_dim=key_dim,
            dropout=self.dropout,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.attention.rotary = self.rotary
        self.output_dense = keras.layers.Dense(dim, dtype=self.dtype_policy, name="output_dense")
        self.attention_norm.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.attention_dropout.build(input_shape)
        self.feedforward_norm.build(input_shape)
        self.intermediate_dense.build(input_shape)
        self.output_dense.build(input_shape[:-1] + (self.intermediate_dim,))
        self.feedforward_dropout.build(input_shape)
        self.built = True

    def call(self, inputs, padding_mask=None, training=None, mask=None):
        if padding_mask is None:
            padding_mask = mask
        attention_mask = None
        if padding_mask is not None:
            # (batch, 1, S): every query may attend every real key, never a padded one.
            # Kept unbroadcast so that no (T, S) mask is materialized (the fused kernel
            # then needs O(T) memory for it, not O(T^2)).
            attention_mask = ops.expand_dims(ops.cast(padding_mask, "bool"), 1)

        x = inputs
        h = self.attention_norm(x) if self.norm_first else x
        h = self.attention(h, h, attention_mask=attention_mask, training=training)
        x = x + self.attention_dropout(h, training=training)
        if not self.norm_first:
            x = self.attention_norm(x)

        h = self.feedforward_norm(x) if self.norm_first else x
        h = self.output_dense(self.intermediate_dense(h))
        x = x + self.feedforward_dropout(h, training=training)
        if not self.norm_first:
            x = self.feedforward_norm(x)
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        config = {
            **super().get_config(),
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "key_dim": self.key_dim,
            "dropout": self.dropout,
            "activation": _checks.serialize_activation(self.activation),
            "norm_first": self.norm_first,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "rotary": self.rotary,
        }
        return _quantization.with_quantized_sublayers(self, config)
