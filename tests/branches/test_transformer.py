import re

import keras
import numpy as np
import pytest

from kfusion.branches import Transformer
from kfusion.layers import PatchEmbedding, PositionEmbedding, TransformerBlock
from tests import helpers
from tests.branches import branch_checks
from tests.branches.branch_checks import LENGTHS, VOCAB
from tests.conftest import requires_tensorflow
from tests.layers.test_patch_embedding import numpy_patches
from tests.layers.test_transformer_block import _layer_norm, numpy_block

POOLINGS = ["cls", "mean", "max", "last", None]


@pytest.fixture
def image_shape():
    return (8, 12, 2)


def make(kind, **kwargs):
    kwargs.setdefault("dim", 8)
    kwargs.setdefault("depth", 1)
    kwargs.setdefault("num_heads", 2)
    kwargs.setdefault("max_length", 16)
    if kind == "tokens":
        kwargs.setdefault("vocab_size", VOCAB)
        kwargs.setdefault("embedding_dim", 5)
    return Transformer(**kwargs)


def _randomize_cls(branch, rng):
    """The CLS token starts at zero; give it values so the formula checks see it."""
    branch.cls_token.assign(rng.normal(size=(branch.dim,)).astype("float32"))


# ----------------------------------------------------------------------------- NumPy reference
def numpy_encoder(branch, z, mask=None):
    """Position table, optional CLS, the blocks, the final norm: the branch after its stem."""
    table = helpers.as_numpy(branch.position_embedding.embeddings)
    z = z + table[None, : z.shape[1]]
    if branch.pooling == "cls":
        cls = np.broadcast_to(helpers.as_numpy(branch.cls_token), (len(z), 1, branch.dim))
        z = np.concatenate([cls, z], axis=1)
        if mask is not None:
            mask = np.concatenate([np.ones((len(z), 1), bool), mask], axis=1)
    for block in branch.blocks:
        z = numpy_block(z, block, "gelu", branch.norm_first, padding_mask=mask)
    if branch.norm_first:
        z = _layer_norm(z, branch.final_norm, 1e-6)
    return z, mask


# ----------------------------------------------------------------------------- config, names
def test_config_roundtrip():
    branch = Transformer(
        dim=12,
        depth=3,
        num_heads=3,
        intermediate_dim=20,
        dropout=0.1,
        max_length=40,
        patch_size=(2, 3),
        vocab_size=50,
        embedding_dim=4,
        pooling="cls",
        output_dim=5,
        norm_first=False,
    )
    clone = helpers.check_config_roundtrip(branch)
    assert clone.patch_size == (2, 3) and clone.depth == 3 and not clone.norm_first
    assert clone.intermediate_dim == 20 and len(clone.blocks) == 3
    default = helpers.check_config_roundtrip(Transformer())
    assert default.get_config()["intermediate_dim"] is None
    assert default.blocks[0].intermediate_dim == 4 * 64


def test_default_names_are_unique():
    branch_checks.check_default_names(
        lambda **kw: Transformer(dim=8, num_heads=2, **kw), "transformer_branch"
    )


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", ["tokens", "sequence", "image"])
@pytest.mark.parametrize("pooling", ["cls", "mean", None])
def test_symbolic_matches_eager(inputs_by_kind, kind, pooling):
    branch = make(kind, pooling=pooling)
    out = helpers.check_symbolic_matches_eager(branch, inputs_by_kind[kind])
    steps = {"tokens": 8, "sequence": 7, "image": 2 * 3}[kind]
    assert tuple(out.shape) == ((4, steps, 8) if pooling is None else (4, 8))


def test_output_dim_and_patch_size(images):
    branch = make("image", pooling=None, patch_size=(2, 4), output_dim=3)
    out = helpers.check_symbolic_matches_eager(branch, images)
    assert tuple(out.shape) == (4, 4 * 3, 3)


def test_unknown_lengths(rng):
    branch = make("tokens", pooling="cls")
    assert tuple(branch(keras.Input((None,), dtype="int32")).shape) == (None, 8)
    for length in (3, 8):
        ids = branch_checks.padded_token_ids(rng, [length, 2], total=length, vocab_size=VOCAB)
        assert tuple(branch(ids).shape) == (2, 8)
    steps = make("sequence", pooling=None)
    assert tuple(steps(keras.Input((None, 3))).shape) == (None, None, 8)
    patches = make("image", pooling=None)
    assert tuple(patches(keras.Input((None, None, 2))).shape) == (None, None, 8)
    assert tuple(patches(rng.normal(size=(2, 8, 4, 2)).astype("float32")).shape) == (2, 2, 8)


def test_position_table_is_sized_from_the_static_length(rng):
    """A 1,460-step series needs no setting: the table has one row per known step."""
    branch = Transformer(dim=8, depth=1, num_heads=2)
    x = rng.normal(size=(2, 1460, 1)).astype("float32")
    assert tuple(branch(x).shape) == (2, 8)
    assert tuple(branch.position_embedding.embeddings.shape) == (1460, 8)
    assert branch.position_rows == 1460
    images = Transformer(dim=8, depth=1, num_heads=2, patch_size=2)
    images(keras.Input((6, 8, 1)))
    assert tuple(images.position_embedding.embeddings.shape) == (12, 8)  # 3 x 4 patches
    unknown = Transformer(dim=8, depth=1, num_heads=2)
    unknown(keras.Input((None, 3)))
    assert unknown.position_rows == 512
    with pytest.raises(ValueError, match=re.escape("length=1461, max_length=1460")):
        branch(np.zeros((2, 1461, 1), "float32"))


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary"])
def test_positions_without_a_table_take_any_length(rng, positions):
    """No table: any length, known or not, and right-padding still changes nothing."""
    branch = make("sequence", positions=positions, max_length=None)
    long = rng.normal(size=(2, 700, 3)).astype("float32")  # longer than the 512 default
    assert tuple(branch(long).shape) == (2, 8)
    assert branch.position_embedding is None and branch.position_rows is None
    assert not [w for w in branch.weights if "position" in w.path]
    assert tuple(
        make("sequence", positions=positions, max_length=None)(keras.Input((None, 3))).shape
    ) == (None, 8)
    x, mask = branch_checks.padded_sequences(rng, LENGTHS, total=8, features=3)
    padded = make("sequence", positions=positions, max_length=None, pooling="cls")
    branch_checks.check_sequence_padding_invariance(padded, x, mask)
    # The order of the steps is seen: reversing a sequence changes the output.
    z = rng.normal(size=(2, 6, 3)).astype("float32")
    assert not np.allclose(helpers.as_numpy(branch(z)), helpers.as_numpy(branch(z[:, ::-1])))


def test_patching_turns_a_long_series_into_few_tokens(rng, tmp_path):
    """PatchTST: (T - L) // S + 1 tokens, one table row each, padding-invariant."""
    branch = make("sequence", max_length=None, patch_length=16, patch_stride=8, pooling=None)
    x = rng.normal(size=(2, 1460, 3)).astype("float32")
    assert tuple(branch(x).shape) == (2, (1460 - 16) // 8 + 1, 8)
    assert branch.position_rows == 181
    # The stem is one linear map of each flattened patch.
    kernel = helpers.as_numpy(branch.projection.kernel)  # (L, F, dim)
    bias = helpers.as_numpy(branch.projection.bias)
    stem = helpers.as_numpy(branch.projection(x))
    patch = x[:, 8 * 5 : 8 * 5 + 16].reshape(2, -1)
    np.testing.assert_allclose(stem[:, 5], patch @ kernel.reshape(-1, 8) + bias, atol=1e-4)
    x, mask = branch_checks.padded_sequences(rng, [5, 3, 6], total=9, features=3)
    padded = make("sequence", patch_length=3, patch_stride=2, pooling="mean")
    branch_checks.check_sequence_padding_invariance(padded, x, mask)
    helpers.check_config_roundtrip(padded)
    helpers.check_saving(padded, x, tmp_path)
    with pytest.raises(ValueError, match=re.escape("length=5, patch_length=16")):
        make("sequence", max_length=None, patch_length=16)(np.zeros((2, 5, 3), "float32"))
    with pytest.raises(ValueError, match=re.escape("patch_stride=4")):
        Transformer(patch_stride=4)


def test_patched_model_checks_data_by_patches(rng):
    import kfusion as kf

    model = kf.FusionModel(
        inputs=keras.Input((1460, 1), name="signal"),
        branches=[Transformer(dim=8, depth=1, num_heads=2, patch_length=16, patch_stride=8)],
        head=kf.heads.Classification(3),
    )
    model.check_data(rng.normal(size=(2, 1460, 1)).astype("float32"))


def test_sinusoidal_positions_match_the_formula():
    from kfusion.layers import _utils

    table = helpers.as_numpy(_utils.sinusoidal_positions(5, 6, "float32"))[0]
    t, i = np.arange(5)[:, None], np.arange(3)[None, :]
    angles = t * 10000.0 ** (-2 * i / 6)
    np.testing.assert_allclose(
        table, np.concatenate([np.sin(angles), np.cos(angles)], -1), atol=1e-6
    )


def test_rotary_scores_depend_on_the_distance_only(rng):
    from kfusion.layers import _utils

    q = np.broadcast_to(rng.normal(size=(1, 1, 2, 8)), (1, 12, 2, 8)).astype("float32")
    k = np.broadcast_to(rng.normal(size=(1, 1, 2, 8)), (1, 12, 2, 8)).astype("float32")
    rq, rk = helpers.as_numpy(_utils.rotary(q)), helpers.as_numpy(_utils.rotary(k))
    scores = np.einsum("bthd,bshd->bhts", rq, rk)[0]
    for offset in (0, 3, -2):
        diagonal = np.diagonal(scores, offset=offset, axis1=1, axis2=2)
        np.testing.assert_allclose(diagonal, diagonal[:, :1] + 0 * diagonal, rtol=1e-4, atol=1e-4)
    # Rotation keeps the norm, and step 0 is not rotated.
    np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(rq[:, 0], q[:, 0], atol=1e-6)
    assert not np.allclose(rq[:, 1], q[:, 1])


@pytest.mark.parametrize("positions", ["sinusoidal", "rotary"])
def test_positions_save_and_load(rng, positions, tmp_path):
    branch = make("sequence", positions=positions, max_length=None, output_dim=3)
    clone = helpers.check_config_roundtrip(branch)
    assert clone.positions == positions
    x = rng.normal(size=(2, 7, 3)).astype("float32")
    helpers.check_saving(branch, x, tmp_path)


# ----------------------------------------------------------------------------- formula
@pytest.mark.parametrize("norm_first", [True, False])
def test_sequences_match_numpy(seq, norm_first):
    branch = make("sequence", depth=2, pooling="mean", norm_first=norm_first)
    out = helpers.as_numpy(branch(seq))
    kernel, bias = branch.projection.get_weights()
    z, _ = numpy_encoder(branch, seq @ kernel + bias)
    np.testing.assert_allclose(out, z.mean(axis=1), rtol=1e-4, atol=1e-4)


def test_padded_token_ids_with_cls_match_numpy(ids, rng):
    branch = make("tokens", pooling="cls", output_dim=3)
    branch.build(ids.shape)
    _randomize_cls(branch, rng)
    out = helpers.as_numpy(branch(ids))
    table = helpers.as_numpy(branch.embedding.embeddings)
    mask = ids != 0
    embedded = table[ids] * mask[..., None]
    kernel, bias = branch.projection.get_weights()
    z, _ = numpy_encoder(branch, embedded @ kernel + bias, mask)
    w_out, b_out = branch.output_projection.get_weights()
    np.testing.assert_allclose(out, z[:, 0] @ w_out + b_out, rtol=1e-4, atol=1e-4)


def test_images_match_numpy_vit(images):
    branch = make("image", pooling=None, patch_size=4)
    out = helpers.as_numpy(branch(images))
    z, _ = numpy_encoder(branch, numpy_patches(images, branch.patch_embedding))
    np.testing.assert_allclose(out, z, rtol=1e-4, atol=1e-4)
    assert branch.compute_mask(images) is None


def test_sublayers():
    branch = make("image", depth=3, pooling="cls")
    branch.build((None, 8, 8, 3))
    assert [b.name for b in branch.blocks] == ["block_0", "block_1", "block_2"]
    assert all(isinstance(b, TransformerBlock) for b in branch.blocks)
    assert isinstance(branch.patch_embedding, PatchEmbedding) and branch.projection is None
    assert isinstance(branch.position_embedding, PositionEmbedding)
    assert all(b.attention.key_dim == 4 for b in branch.blocks)


def test_weight_count():
    dim, heads, inter, vocab, emb, max_length = 8, 2, 32, 10, 4, 16
    branch = Transformer(
        dim=dim,
        depth=2,
        num_heads=heads,
        max_length=max_length,
        vocab_size=vocab,
        embedding_dim=emb,
        pooling="cls",
        output_dim=3,
    )
    branch.build((None, 7))
    key = dim // heads
    block = (
        3 * (dim * heads * key + heads * key)
        + heads * key * dim
        + dim  # attention
        + 2 * 2 * dim  # two layer norms
        + dim * inter
        + inter
        + inter * dim
        + dim  # feed-forward
    )
    expected = (
        vocab * emb  # token embedding
        + emb * dim
        + dim  # projection
        + max_length * dim  # position table
        + dim  # CLS token
        + 2 * block
        + 2 * dim  # final norm
        + dim * 3
        + 3  # output projection
    )
    assert branch.count_params() == expected

    post = Transformer(dim=8, depth=1, num_heads=2, norm_first=False, patch_size=(2, 3))
    post.build((None, 8, 9, 3))
    patch_embedding = 2 * 3 * 3 * dim + dim
    # The table has one row per patch of the known image size: (8 // 2) * (9 // 3) = 12.
    # No final norm, no CLS.
    assert post.count_params() == patch_embedding + 12 * dim + block
    assert post.final_norm is None and post.cls_token is None


# ----------------------------------------------------------------------------- padding, masks
@pytest.mark.parametrize("pooling", POOLINGS)
def test_token_padding_never_changes_the_output(ids, rng, pooling):
    branch = make("tokens", pooling=pooling, depth=2)
    if pooling == "cls":
        branch.build(ids.shape)
        _randomize_cls(branch, rng)
    out = branch_checks.check_token_padding_invariance(branch, ids)
    if pooling is None:  # padded steps of the returned tokens are zero
        np.testing.assert_array_equal(helpers.as_numpy(out)[ids == 0], 0.0)


@pytest.mark.parametrize("pooling", ["cls", "mean", "last", None])
def test_token_padding_invariance_post_norm(ids, pooling):
    branch = make("tokens", pooling=pooling, norm_first=False)
    branch_checks.check_token_padding_invariance(branch, ids)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_masked_sequence_padding_never_changes_the_output(rng, pooling):
    x, mask = branch_checks.padded_sequences(rng, LENGTHS, total=8, features=3)
    branch = make("sequence", pooling=pooling)
    branch_checks.check_sequence_padding_invariance(branch, x, mask)


def test_masking_layer_padding_never_changes_the_output(rng):
    x, mask = branch_checks.padded_sequences(rng, LENGTHS, total=8, features=3, garbage=False)
    branch = make("sequence", pooling="cls")
    branch_checks.check_masking_layer_invariance(branch, x, mask)


def test_pooling_none_returns_tokens_and_mask(ids):
    branch = make("tokens", pooling=None, output_dim=3)
    assert tuple(branch(ids).shape) == (4, 8, 3)
    np.testing.assert_array_equal(helpers.as_numpy(branch.compute_mask(ids)), ids != 0)
    symbolic = branch(keras.Input((8,), dtype="int32"))
    assert tuple(symbolic.shape) == (None, 8, 3)
    assert tuple(symbolic._keras_mask.shape) == (None, 8)


def test_pooled_output_has_no_mask(ids):
    for pooling in ("cls", "mean"):
        branch = make("tokens", pooling=pooling)
        branch(ids)
        assert branch.compute_mask(ids) is None


# ----------------------------------------------------------------------------- training, dtypes
@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("tokens", {"dropout": 0.1, "pooling": "cls"}),
        ("sequence", {"norm_first": False, "pooling": "last"}),
        ("image", {"pooling": "max", "output_dim": 3}),
    ],
)
def test_fit_step(inputs_by_kind, kind, kwargs):
    helpers.check_fit_step(make(kind, **kwargs), inputs_by_kind[kind])


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("tokens", {"pooling": "cls", "dropout": 0.1}),
        ("image", {"pooling": None, "output_dim": 3}),
        ("sequence", {"positions": "rotary", "max_length": None}),
        ("sequence", {"positions": "sinusoidal", "max_length": None}),
    ],
)
def test_mixed_precision(inputs_by_kind, kind, kwargs, policy):
    branch, _ = helpers.check_mixed_precision(
        lambda: make(kind, **kwargs), inputs_by_kind[kind], policy
    )
    assert all(
        block.compute_dtype == keras.DTypePolicy(policy).compute_dtype for block in branch.blocks
    )


@pytest.mark.parametrize("kind, pooling", [("tokens", "cls"), ("image", "mean")])
def test_save_and_load(inputs_by_kind, kind, pooling, rng, tmp_path):
    branch = make(kind, depth=2, pooling=pooling, output_dim=3)
    if pooling == "cls":
        branch.build(inputs_by_kind[kind].shape)
        _randomize_cls(branch, rng)
    loaded = helpers.check_saving(branch, inputs_by_kind[kind], tmp_path)
    assert isinstance(loaded.layers[-1], Transformer)


@requires_tensorflow
def test_saved_model_export(ids, tmp_path):
    helpers.check_saved_model(make("tokens", pooling="cls"), ids, tmp_path)


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"dim": 0}, "dim"),
        ({"dim": 2.5}, "dim"),
        ({"depth": 0}, "depth"),
        ({"num_heads": 0}, "num_heads"),
        ({"intermediate_dim": 0}, "intermediate_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"max_length": 0}, "max_length"),
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": (1, 2, 3)}, "patch_size"),
        ({"pooling": "first"}, "pooling"),
        ({"output_dim": 0}, "output_dim"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"norm_first": "yes"}, "norm_first"),
        ({"positions": "absolute"}, "positions"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=re.escape(f"{name}={kwargs[name]!r}")):
        Transformer(**kwargs)


def test_positions_arguments_that_cannot_hold():
    with pytest.raises(ValueError, match=re.escape("max_length=64")):
        Transformer(positions="sinusoidal", max_length=64)
    with pytest.raises(ValueError, match=re.escape("dim=6, num_heads=2")):
        Transformer(dim=6, num_heads=2, positions="rotary")
    with pytest.raises(ValueError, match=re.escape("dim=9")):
        Transformer(dim=9, num_heads=3, positions="sinusoidal")


def test_dim_must_be_a_multiple_of_num_heads():
    with pytest.raises(ValueError, match=re.escape("dim=10, num_heads=4")):
        Transformer(dim=10, num_heads=4)


def test_bad_inputs(seq, images):
    with pytest.raises(ValueError, match="cannot take input"):
        make("sequence")(np.ones((2, 5), "float32"))  # float vectors without vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        make("sequence")(np.ones((2, 5), "int32"))  # token ids without vocab_size
    with pytest.raises(ValueError, match="cannot take input"):
        make("sequence")(np.ones((2, 3, 4, 5, 2), "float32"))  # rank 5
    with pytest.raises(ValueError, match="expects integer token ids"):
        make("tokens")(np.ones((2, 5), "float32"))
    with pytest.raises(ValueError, match=re.escape("length=7, max_length=6")):
        make("sequence", max_length=6)(seq)
    with pytest.raises(ValueError, match=re.escape("length=6, max_length=5")):
        make("image", max_length=5)(images)  # 2 x 3 patches
    with pytest.raises(ValueError, match=re.escape("H=8, W=12")):
        make("image", patch_size=9)(images)
    with pytest.raises(ValueError, match="known feature"):
        make("sequence")(keras.Input((5, None)))


def test_built_branch_rejects_a_longer_sequence_or_another_kind(seq, images):
    branch = Transformer(dim=8, depth=1, num_heads=2, max_length=8)
    branch(seq)
    with pytest.raises(ValueError, match=re.escape("length=9, max_length=8")):
        branch(np.zeros((2, 9, seq.shape[-1]), "float32"))
    with pytest.raises(ValueError, match="expected ndim=3"):
        branch(images)


@pytest.mark.parametrize("norm_first", [True, False])
def test_save_and_load_mixed_float16(ids, norm_first, rng, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    branch = make("tokens", depth=2, pooling="cls", norm_first=norm_first)
    branch.build(ids.shape)
    _randomize_cls(branch, rng)
    helpers.check_saving_mixed_float16(branch, ids, tmp_path, atol=1e-3)
