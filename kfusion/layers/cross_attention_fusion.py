import keras
from keras import ops

from kfusion import _checks, _quantization
from kfusion.layers import _utils
from kfusion.layers.transformer_block import _fused_attention, _use_fused_attention

# Masked attention logits are replaced by this before the (float32) softmax: exp() of it
# underflows to exactly 0, so padded keys get exactly zero weight.
_MASKED_LOGIT = -1e9


class _Float32SoftmaxAttention(keras.layers.MultiHeadAttention):
    """`MultiHeadAttention` whose softmax always computes in float32.

    Keras' `MultiHeadAttention` has two paths. Its explicit one (taken with
    dropout or returned scores) runs a `Softmax` layer in the compute dtype, i.e.
    float16/bfloat16 under a mixed policy. Its fast one calls
    `ops.dot_product_attention`, whose precision and handling of fully masked
    rows are left to each backend (float32 softmax on TensorFlow and JAX, the
    fused kernel on torch). This override of the documented `_compute_attention`
    hook always computes the same way: logits in the compute dtype, masking and
    softmax in float32 (fully masked rows get all-zero weights, never NaN), then
    the weights are cast to the compute dtype to combine the values; the
    returned scores stay float32. Without active attention dropout and without
    returned scores, on backends with a fused attention kernel (PyTorch; JAX
    off CPU), the same masked attention (fully masked rows still give a zero
    output) is computed by `ops.dot_product_attention` instead. Private:
    `CrossAttentionFusion.build` creates it and its config never gets saved
    (the owning layer's config rebuilds it).
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
        if kwargs.get("use_causal_mask"):
            raise ValueError("This attention layer does not support `use_causal_mask`.")
        # query (B, T, N, H), key/value (B, S, N, H): the layer only sees rank-3 inputs.
        if _use_fused_attention(self, query, training, return_attention_scores):
            output = _fused_attention(
                query, key, value, attention_mask, scale=1.0 / float(self.key_dim) ** 0.5
            )
            return output, None
        scale = ops.cast(1.0 / float(self.key_dim) ** 0.5, query.dtype)
        logits = ops.einsum("bsnh,btnh->bnts", key, ops.multiply(query, scale))
        logits = ops.cast(logits, "float32")
        if attention_mask is not None:
            mask = ops.expand_dims(ops.cast(attention_mask, "bool"), axis=1)  # (B, 1, T, S)
            logits = ops.where(mask, logits, _MASKED_LOGIT)
        if logits.shape[-1] == 1:
            # A single key (the other branch is one vector): softmax is exactly 1.
            # Written out to skip keras' warning about a softmax over a size-1 axis.
            weights = ops.ones_like(logits)
        else:
            weights = _utils.softmax_float32(logits, axis=-1)
        if attention_mask is not None:
            weights = ops.where(mask, weights, 0.0)
        mixed = ops.cast(weights, value.dtype)
        if self.dropout > 0.0:
            mixed = self._dropout_layer(mixed, training=training)
        output = ops.einsum("bnts,bsnh->btnh", mixed, value)
        return output, weights


@keras.saving.register_keras_serializable(package="kfusion")
class CrossAttentionFusion(keras.layers.Layer):
    """Token-level fusion: each branch's tokens attend to all other branches' tokens.

    Cross-modal attention in the style of the Multimodal Transformer (Tsai et
    al. 2019, *Multimodal Transformer for Unaligned Multimodal Language
    Sequences*), generalised to M branches. With branch tokens h_m of shape
    `(T_m, d_m)` (a vector is one token) and boolean padding masks q_m:

        p_m   = W_m h_m + b_m                                  (T_m, dim)
        k_m   = [p_j ; j != m]         (other branches' tokens, concatenated)
        A_m   = q_m k_m_mask^T          (query valid AND key valid, (T_m, S_m))
        a_m   = MHA_m(query=p_m, key=value=k_m, attention_mask=A_m)
        u_m   = LayerNorm_m(p_m + dropout(a_m))                (epsilon 1e-6)
        out   = [mean_{t: q_m[t]} u_m[t] ; ...]                 (M * dim,)

    Each branch has its own projection, `MultiHeadAttention` and
    `LayerNormalization`. Padded keys never receive attention and padded
    queries are left out of the pooling, so right-padding any branch with
    masked steps does not change the output. Softmax and normalisation
    statistics compute in float32 under mixed precision.

    Args:
        dim: int, width every branch is projected to (and the attention width).
        num_heads: int, number of attention heads. Defaults to 4.
        key_dim: int or None, size of each head for query and key (and value).
            `None` uses `dim // num_heads`.
        dropout: float in [0, 1). Dropout on the attention weights and on the
            attention output before the residual.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a list or dict of at least two tensors, each `(batch, T_m, d_m)`
            (`T_m` may differ and may be None) or `(batch, d_m)` (one token).
            Dicts are read in sorted key order.
        training: bool, whether dropout is active.
        mask: None, or a list/dict (same structure as `inputs`) whose entries are
            None or boolean `(batch, T_m)` tensors, True for real steps. Keras
            masks (e.g. from `Embedding(mask_zero=True)`) are passed
            automatically. Masks of vector inputs are ignored.
        presence: None, or a `(batch, M)` tensor, 1 where branch m is present and 0
            where it is absent (`kf.layers.MissingModalities`): an absent branch's
            tokens are no other branch's keys.

    Returns:
        A tensor of shape `(batch, M * dim)`: the M pooled branch vectors,
        concatenated in input order.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> text = np.ones((2, 7, 5), "float32")
    >>> audio = np.ones((2, 3, 4), "float32")
    >>> image = np.ones((2, 6), "float32")
    >>> tuple(kf.layers.CrossAttentionFusion(dim=8, num_heads=2)([text, audio, image]).shape)
    (2, 24)
    >>> mask = np.array([[True] * 7, [True] * 4 + [False] * 3])
    >>> layer = kf.layers.CrossAttentionFusion(dim=8)
    >>> tuple(layer([text, audio], mask=[mask, None]).shape)
    (2, 16)
    """

    def __init__(self, dim, num_heads=4, key_dim=None, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.dim = _checks.check_int("dim", dim)
        self.num_heads = _checks.check_int("num_heads", num_heads)
        self.key_dim = _checks.check_int("key_dim", key_dim, allow_none=True)
        self.dropout = _checks.check_rate("dropout", dropout)
        if self.key_dim is None and self.dim < self.num_heads:
            raise ValueError(
                "`key_dim` defaults to dim // num_heads, which is 0 for "
                f"dim={self.dim} and num_heads={self.num_heads}: pass `key_dim` or use "
                f"num_heads <= dim. Received: num_heads={num_heads!r}"
            )
        self.supports_masking = True
        self.dropout_layer = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="dropout"
        )
        # Per-branch sub-layers: their number is only known in build().
        self.projections = []
        self.attention_layers = []
        self.layer_norms = []

    @property
    def _head_size(self):
        return self.key_dim if self.key_dim is not None else self.dim // self.num_heads

    def _shapes(self, input_shape):
        shapes = _utils.flatten_shapes(input_shape, self.__class__.__name__)
        _utils.check_ranks(shapes, self.__class__.__name__, {2, 3})
        return shapes

    def build(self, input_shape):
        shapes = self._shapes(input_shape)
        # Later calls need as many inputs, each of the same width (a vector or a sequence).
        self.input_spec = [
            keras.InputSpec(min_ndim=2, max_ndim=3, axes={-1: s[-1]}) for s in shapes
        ]
        tokens = [s[1] if len(s) == 3 else 1 for s in shapes]
        for i, shape in enumerate(shapes):
            projection = keras.layers.Dense(
                self.dim, dtype=self.dtype_policy, name=f"projection_{i}"
            )
            attention = _Float32SoftmaxAttention(
                num_heads=self.num_heads,
                key_dim=self._head_size,
                dropout=self.dropout,
                dtype=self.dtype_policy,
                name=f"attention_{i}",
            )
            layer_norm = keras.layers.LayerNormalization(
                epsilon=1e-6, dtype=self.dtype_policy, name=f"layer_norm_{i}"
            )
            others = [t for j, t in enumerate(tokens) if j != i]
            keys = None if any(t is None for t in others) else sum(others)
            projection.build((None, tokens[i], shape[-1]))
            attention.build((None, tokens[i], self.dim), (None, keys, self.dim))
            layer_norm.build((None, tokens[i], self.dim))
            self.projections.append(projection)
            self.attention_layers.append(attention)
            self.layer_norms.append(layer_norm)
        self.built = True

    def call(self, inputs, training=None, mask=None, presence=None):
        items, _ = _utils.flatten_inputs(inputs, self.__class__.__name__)
        masks = _utils.flatten_masks(mask, len(items))
        if len(masks) != len(items):
            raise ValueError(
                f"{self.__class__.__name__} needs one mask entry (or None) per input: "
                f"{len(items)} inputs but {len(masks)} masks."
            )
        tokens, token_masks = [], []
        for i, (x, m) in enumerate(zip(items, masks)):
            if len(x.shape) == 2:
                x, m = ops.expand_dims(x, 1), None  # a vector is one always-valid token
            p = self.projections[i](x)
            tokens.append(p)
            if m is None:
                m = ops.ones_like(p[..., 0], dtype="bool")
            token_masks.append(ops.cast(m, "bool"))
        # An absent branch's tokens are no one's keys (its own queries still attend).
        key_masks = token_masks
        if presence is not None:
            present = ops.cast(presence, "bool")
            key_masks = [
                ops.logical_and(m, ops.expand_dims(present[:, i], -1))
                for i, m in enumerate(token_masks)
            ]
        pooled = []
        for i, (query, query_mask) in enumerate(zip(tokens, token_masks)):
            others = [j for j in range(len(tokens)) if j != i]
            keys = ops.concatenate([tokens[j] for j in others], axis=1)
            key_mask = ops.concatenate([key_masks[j] for j in others], axis=1)
            attention_mask = ops.logical_and(
                ops.expand_dims(query_mask, 2), ops.expand_dims(key_mask, 1)
            )
            attended = self.attention_layers[i](
                query, keys, attention_mask=attention_mask, training=training
            )
            attended = self.dropout_layer(attended, training=training)
            fused = self.layer_norms[i](query + attended)
            pooled.append(_utils.masked_mean(fused, query_mask))
        return ops.concatenate(pooled, axis=-1)

    def compute_output_shape(self, input_shape):
        shapes = self._shapes(input_shape)
        return (shapes[0][0], len(shapes) * self.dim)

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        config = {
            **super().get_config(),
            "dim": self.dim,
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "dropout": self.dropout,
        }
        return _quantization.with_quantized_sublayers(self, config)
