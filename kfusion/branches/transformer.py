import keras
from keras import ops

from kfusion import _checks
from kfusion.branches._base import BaseBranch
from kfusion.layers import _utils
from kfusion.layers.patch_embedding import PatchEmbedding
from kfusion.layers.position_embedding import PositionEmbedding
from kfusion.layers.transformer_block import TransformerBlock

POSITIONS = ("learned", "sinusoidal", "rotary")
# Rows of the position table when neither `max_length` nor the input's length is known.
DEFAULT_TABLE_LENGTH = 512


@keras.saving.register_keras_serializable(package="kfusion")
class Transformer(BaseBranch):
    """A Transformer encoder branch for token ids, sequences and images.

    A stack of `depth` `TransformerBlock`s (Vaswani et al. 2017, *Attention
    Is All You Need*; pre-norm by default, Xiong et al. 2020) over `dim`-wide
    tokens made from the input:

        token ids  (batch, T):        z = W_p Embed(ids) + b_p + P[:T]
        sequences  (batch, T, F):     z = W_p x + b_p + P[:T]
        patched    (batch, T, F):     z_j = W_p vec(x[jS : jS + L]) + b_p + P[j]   (PatchTST)
        images     (batch, H, W, C):  z = PatchEmbed(x) + P[:N]   (ViT, Dosovitskiy et al. 2021)
        z = dropout(z); z = [c; z] when pooling="cls"
        z = block_depth(... block_1(z, mask) ...); z = LN(z) when norm_first

    `P` is a learned position table and `c` a learned CLS token (BERT,
    Devlin et al. 2019; ViT). The table has one row per token of the
    input's static length (T, or N = (H // ph) * (W // pw) patches) when that
    length is known when the branch is built, so a 1,460-step series needs no
    setting; `max_length` rows when given; otherwise 512 rows. The CLS token
    is prepended after the position embedding, so the table bounds the input
    length and not the length plus one. `positions="sinusoidal"` adds the
    fixed sines and cosines of Vaswani et al. 2017 instead, and
    `positions="rotary"` rotates every block's queries and keys (RoFormer, Su
    et al. 2021): neither has a table, so any length is taken, known or not.

    Token ids use id 0 as padding: their mask (and the keras mask of a float
    sequence) becomes the blocks' padding mask, so padded steps are never
    attended and right-padding never changes the result. With
    `pooling="cls"` the mask is extended by one True for the CLS token and
    the CLS token's final state is returned. `"mean"`, `"max"` and `"last"`
    pool the final tokens with the mask. Padded steps of the returned
    tokens (`pooling=None`) are zero.

    Under mixed precision the attention softmax and the layer norm
    statistics are computed in float32; the output is in the policy's
    compute dtype.

    Args:
        dim: int, the token width (model dimension). Must be a multiple of
            `num_heads`. Defaults to 64.
        depth: int, the number of Transformer blocks. Defaults to 2.
        num_heads: int, attention heads per block (each of size
            `dim // num_heads`). Defaults to 4.
        intermediate_dim: int or None, the feed-forward hidden width.
            Defaults to `4 * dim`.
        dropout: float in [0, 1), dropout on the embedded tokens and inside
            every block.
        max_length: int or None, the longest input (steps or patches) the
            position table covers. None (the default): the input's static
            length when known at build time, else 512.
        positions: `"learned"` (a position table, the default),
            `"sinusoidal"` or `"rotary"` (no table, any length; `"rotary"`
            needs an even `dim // num_heads`).
        patch_size: int or pair `(ph, pw)`, the image patch size (images
            only). Defaults to 4.
        patch_length: int or None. When given, a float sequence is cut into
            patches of `patch_length` steps every `patch_stride` steps, each
            projected to one token (PatchTST, Nie et al. 2023): a T-step
            series becomes `(T - L) // S + 1` tokens, which cuts attention
            cost by about `S ** 2`. A patch is padding unless all its steps
            are real; with `pooling=None` the patch tokens carry no mask.
        patch_stride: int or None, the step between patches. Defaults to
            `patch_length` (patches that do not overlap).
        vocab_size: int or None. When given, the branch takes integer token
            ids (0 is padding) and embeds them.
        embedding_dim: int or None, the token embedding width before the
            projection to `dim`. Defaults to 64.
        pooling: `"cls"`, `"mean"`, `"max"`, `"last"` (masked), or None to
            return every token with its mask. Defaults to `"mean"`.
        output_dim: int or None, width of a final linear projection (per
            token when `pooling=None`).
        norm_first: bool, pre-norm blocks and a final `LayerNormalization`
            (True) or post-norm blocks (False).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: integer token ids `(batch, T)` (with `vocab_size`), a float
            sequence `(batch, T, F)` or an image `(batch, H, W, C)`. `T` may
            be unknown until call time (then at most `max_length`, or 512).
        training: bool, whether dropout is active.
        mask: optional boolean `(batch, T)` mask for float sequences (token
            ids make their own mask from the zeros).

    Returns:
        `(batch, D)` with a pooling, otherwise `(batch, T, D)` for token ids
        and sequences (with the input's mask) or `(batch, N, D)` for images,
        where `D` is `output_dim` or `dim`.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> encoder = kf.branches.Transformer(dim=16, depth=1, num_heads=2)
    >>> tuple(encoder(np.ones((2, 10, 4), "float32")).shape)
    (2, 16)
    >>> vit = kf.branches.Transformer(dim=16, depth=1, num_heads=2, patch_size=4, pooling="cls")
    >>> tuple(vit(np.ones((2, 8, 8, 3), "float32")).shape)
    (2, 16)
    >>> text = kf.branches.Transformer(dim=8, depth=1, num_heads=2, vocab_size=100, pooling=None)
    >>> tuple(text(np.array([[5, 7, 9, 0], [3, 0, 0, 0]])).shape)
    (2, 4, 8)
    """

    name_prefix = "transformer_branch"
    kinds = ("tokens", "sequence", "image")
    poolings = ("cls", "mean", "max", "last", None)

    def __init__(
        self,
        dim=64,
        depth=2,
        num_heads=4,
        intermediate_dim=None,
        dropout=0.0,
        max_length=None,
        positions="learned",
        patch_size=4,
        patch_length=None,
        patch_stride=None,
        vocab_size=None,
        embedding_dim=None,
        pooling="mean",
        output_dim=None,
        norm_first=True,
        **kwargs,
    ):
        dim = _checks.check_int("dim", dim)
        depth = _checks.check_int("depth", depth)
        num_heads = _checks.check_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(
                "`dim` must be a multiple of `num_heads`. "
                f"Received: dim={dim}, num_heads={num_heads}"
            )
        intermediate_dim = _checks.check_int("intermediate_dim", intermediate_dim, allow_none=True)
        dropout = _checks.check_rate("dropout", dropout)
        max_length = _checks.check_int("max_length", max_length, allow_none=True)
        positions = _checks.check_choice("positions", positions, POSITIONS)
        if positions != "learned" and max_length is not None:
            raise ValueError(
                "`max_length` sizes the learned position table; "
                f"positions={positions!r} has none. Received: max_length={max_length}"
            )
        if positions == "sinusoidal" and dim % 2:
            raise ValueError(f"positions='sinusoidal' needs an even `dim`. Received: dim={dim}")
        if positions == "rotary" and (dim // num_heads) % 2:
            raise ValueError(
                "positions='rotary' needs an even head size `dim // num_heads`. "
                f"Received: dim={dim}, num_heads={num_heads}"
            )
        patch_size = _checks.check_int_tuple("patch_size", patch_size)
        if len(patch_size) not in (1, 2):
            raise ValueError(
                "`patch_size` must be an integer or a pair (ph, pw). "
                f"Received: patch_size={patch_size!r}"
            )
        patch_length = _checks.check_int("patch_length", patch_length, allow_none=True)
        patch_stride = _checks.check_int("patch_stride", patch_stride, allow_none=True)
        if patch_stride is not None and patch_length is None:
            raise ValueError(
                "`patch_stride` needs a `patch_length`. "
                f"Received: patch_stride={patch_stride}, patch_length=None"
            )
        norm_first = _checks.check_bool("norm_first", norm_first)
        super().__init__(
            pooling=pooling,
            output_dim=output_dim,
            vocab_size=vocab_size,
            embedding_dim=embedding_dim,
            **kwargs,
        )
        self.dim = dim
        self.depth = depth
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.max_length = max_length
        self.positions = positions
        self.patch_size = patch_size * 2 if len(patch_size) == 1 else patch_size
        self.patch_length = patch_length
        self.patch_stride = patch_stride
        self.norm_first = norm_first

        # The position table's length comes from the input when max_length is None:
        # `_build_body` creates it.
        self.position_embedding = None
        self.embedding_dropout = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="embedding_dropout"
        )
        self.blocks = [
            TransformerBlock(
                num_heads=self.num_heads,
                intermediate_dim=self.intermediate_dim or 4 * self.dim,
                dropout=self.dropout,
                norm_first=self.norm_first,
                rotary=self.positions == "rotary",
                dtype=self.dtype_policy,
                name=f"block_{i}",
            )
            for i in range(self.depth)
        ]
        self.final_norm = None
        if self.norm_first:
            self.final_norm = keras.layers.LayerNormalization(
                epsilon=1e-6, dtype=self.dtype_policy, name="final_norm"
            )
        # The input stem (a Dense projection for token ids and sequences, a
        # PatchEmbedding for images) and the CLS token depend on the input
        # kind and width: `_build_body` creates them.
        self.projection = None
        self.patch_embedding = None
        self.cls_token = None

    @property
    def position_rows(self):
        """The number of steps (or patches) the position table holds (None before build)."""
        if self.position_embedding is not None:
            return self.position_embedding.max_length
        return self.max_length

    @property
    def _stride(self):
        return self.patch_stride or self.patch_length

    def _patched(self, kind):
        return kind == "sequence" and self.patch_length is not None

    def _body_keeps_length(self, kind):
        return kind in ("tokens", "sequence") and not self._patched(kind)

    def token_count(self, input_shape):
        """The tokens an input of this shape becomes: steps, patches or image patches.

        Rank 2 is token ids, rank 3 a float sequence (patched with `patch_length`), rank
        4 an image. None where the length is unknown.
        """
        kind = {2: "tokens", 3: "sequence", 4: "image"}[len(input_shape)]
        return self._token_count(kind, tuple(input_shape))

    # ----------------------------------------------------------- body contract
    def _token_count(self, kind, shape):
        """The number of tokens the blocks see before any CLS token (None if unknown)."""
        if kind != "image":
            if self._patched(kind) and shape[1] is not None:
                return (shape[1] - self.patch_length) // self._stride + 1
            return shape[1]
        (ph, pw), height, width = self.patch_size, shape[1], shape[2]
        return None if height is None or width is None else (height // ph) * (width // pw)

    def _build_body(self, kind, shape):
        shape = tuple(shape)
        if kind == "image":
            self.patch_embedding = PatchEmbedding(
                self.patch_size, self.dim, dtype=self.dtype_policy, name="patch_embedding"
            )
            self.patch_embedding.build(shape)
            shape = tuple(self.patch_embedding.compute_output_shape(shape))
        elif self._patched(kind):
            if shape[1] is not None and shape[1] < self.patch_length:
                raise ValueError(
                    f"Transformer branch '{self.name}' needs at least patch_length steps. "
                    f"Received: length={shape[1]}, patch_length={self.patch_length}"
                )
            self.projection = keras.layers.Conv1D(
                self.dim,
                self.patch_length,
                strides=self._stride,
                dtype=self.dtype_policy,
                name="patch_projection",
            )
            self.projection.build(shape)
            shape = (shape[0], self._token_count(kind, shape), self.dim)
        else:
            self.projection = keras.layers.Dense(
                self.dim, dtype=self.dtype_policy, name="projection"
            )
            self.projection.build(shape)
            shape = shape[:-1] + (self.dim,)
        if shape[1] is not None and self.max_length is not None and shape[1] > self.max_length:
            what = "patches" if kind == "image" else "steps"
            raise ValueError(
                f"Transformer branch '{self.name}' got more {what} than its position table "
                f"holds. Received: length={shape[1]}, max_length={self.max_length}"
            )
        if self.positions == "learned":
            rows = self.max_length or shape[1] or DEFAULT_TABLE_LENGTH
            self.position_embedding = PositionEmbedding(
                rows, dtype=self.dtype_policy, name="position_embedding"
            )
            self.position_embedding.build(shape)
        self.embedding_dropout.build(shape)
        if self.pooling == "cls":
            self.cls_token = self.add_weight(
                shape=(self.dim,), initializer="zeros", name="cls_token"
            )
            shape = (shape[0], None if shape[1] is None else shape[1] + 1, self.dim)
        for block in self.blocks:
            block.build(shape)
        if self.final_norm is not None:
            self.final_norm.build(shape)

    def _call_body(self, x, mask, kind, training):
        x = ops.cast(x, self.compute_dtype)
        if kind == "image":
            x = self.patch_embedding(x)
            mask = None
        else:
            x = self.projection(x)
            if mask is not None and self._patched(kind):
                # A patch is real when all its steps are: min-pool the mask over each patch.
                missing = 1.0 - ops.cast(ops.expand_dims(mask, -1), "float32")
                missing = ops.max_pool(missing, self.patch_length, self._stride, "valid")
                mask = ops.squeeze(missing, -1) < 0.5
        if self.positions == "learned":
            x = self.position_embedding(x)
        elif self.positions == "sinusoidal":
            x = x + _utils.sinusoidal_positions(ops.shape(x)[1], self.dim, x.dtype)
        x = self.embedding_dropout(x, training=training)
        if mask is not None:
            mask = ops.cast(mask, "bool")
        if self.pooling == "cls":
            cls = ops.zeros_like(x[:, :1, :]) + ops.cast(self.cls_token, x.dtype)
            x = ops.concatenate([cls, x], axis=1)
            if mask is not None:
                mask = ops.concatenate([ops.ones_like(mask[:, :1]), mask], axis=1)
        for block in self.blocks:
            x = block(x, padding_mask=mask, training=training)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.pooling == "cls":
            return x[:, 0, :], None
        return _utils.zero_padded(x, mask), mask

    def _body_output_shape(self, kind, shape):
        shape = tuple(shape)
        if self.pooling == "cls":
            return (shape[0], self.dim)
        return (shape[0], self._token_count(kind, shape), self.dim)

    def get_config(self):
        return {
            **super().get_config(),
            "dim": self.dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "intermediate_dim": self.intermediate_dim,
            "dropout": self.dropout,
            "max_length": self.max_length,
            "positions": self.positions,
            "patch_size": self.patch_size,
            "patch_length": self.patch_length,
            "patch_stride": self.patch_stride,
            "norm_first": self.norm_first,
        }
