"""Branches: layers that turn one input into features, adapting to its rank and dtype."""

from kfusion.branches.backbone import Backbone
from kfusion.branches.cnn import CNN
from kfusion.branches.fcn import FCN
from kfusion.branches.inception_time import InceptionTime
from kfusion.branches.mlp import MLP
from kfusion.branches.resnet import ResNet
from kfusion.branches.rnn import RNN
from kfusion.branches.transformer import Transformer

__all__ = [
    "Backbone",
    "CNN",
    "FCN",
    "InceptionTime",
    "MLP",
    "ResNet",
    "RNN",
    "Transformer",
]
