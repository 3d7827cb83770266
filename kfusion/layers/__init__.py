"""Fusion layers and the reusable blocks kfusion's branches are built from."""

from kfusion.layers.attention_fusion import AttentionFusion
from kfusion.layers.auxiliary_heads import AuxiliaryHeads
from kfusion.layers.branch_dropout import BranchDropout
from kfusion.layers.concat_fusion import ConcatFusion
from kfusion.layers.cross_attention_fusion import CrossAttentionFusion
from kfusion.layers.film_fusion import FiLMFusion
from kfusion.layers.gated_fusion import GatedFusion
from kfusion.layers.gradient_modulation import GradientModulation
from kfusion.layers.input_normalization import InputNormalization
from kfusion.layers.low_rank_fusion import LowRankFusion
from kfusion.layers.min_gru import MinGRU
from kfusion.layers.min_lstm import MinLSTM
from kfusion.layers.missing_modalities import MissingModalities
from kfusion.layers.patch_embedding import PatchEmbedding
from kfusion.layers.position_embedding import PositionEmbedding
from kfusion.layers.transformer_block import TransformerBlock
from kfusion.layers.weighted_sum_fusion import WeightedSumFusion

__all__ = [
    "AttentionFusion",
    "AuxiliaryHeads",
    "BranchDropout",
    "ConcatFusion",
    "CrossAttentionFusion",
    "FiLMFusion",
    "GatedFusion",
    "GradientModulation",
    "InputNormalization",
    "LowRankFusion",
    "MinGRU",
    "MinLSTM",
    "MissingModalities",
    "PatchEmbedding",
    "PositionEmbedding",
    "TransformerBlock",
    "WeightedSumFusion",
]
