"""Fusion layers by name (private): the names FusionModel's `fusion=` accepts."""

import difflib

from kfusion import _checks, layers

FUSION_NAMES = {
    "concat": "ConcatFusion",
    "weighted": "WeightedSumFusion",
    "attention": "AttentionFusion",
    "gated": "GatedFusion",
    "cross_attention": "CrossAttentionFusion",
    "low_rank": "LowRankFusion",
    "film": "FiLMFusion",
}


def suggest(value, choices):
    """' Did you mean ...?' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_fusion_name(fusion):
    if fusion not in FUSION_NAMES:
        raise ValueError(
            f"`fusion` must be one of {sorted(FUSION_NAMES)} or a fusion layer instance. "
            f"Received: fusion={fusion!r}.{suggest(fusion, FUSION_NAMES)}"
        )
    return fusion


def make_fusion(fusion, widths, units=None, dtype=None):
    """A fusion layer for `fusion` (a name) given the branch feature widths."""
    check_fusion_name(fusion)
    _checks.check_int("fusion_units", units, allow_none=True)
    width = units or max(widths)
    cls = getattr(layers, FUSION_NAMES[fusion])
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if fusion == "concat":
        return cls(units=units, **kwargs)
    if fusion == "cross_attention":
        heads = 4 if width % 4 == 0 else (2 if width % 2 == 0 else 1)
        return cls(dim=width, num_heads=heads, **kwargs)
    if fusion == "low_rank":
        return cls(units=width, rank=4, **kwargs)
    if fusion == "film":
        return cls(**kwargs)
    return cls(units=width, **kwargs)
