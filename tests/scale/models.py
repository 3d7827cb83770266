"""The small FusionModel the scale tests train (imported by tests and worker processes)."""

import keras

import kfusion as kf


def small_fusion_model():
    """CNN | GRU | Transformer on a (8, 3) sequence -> gated fusion -> 3 classes.

    No dropout anywhere (every default rate is 0), so two copies with the same weights
    compute the same function (the MirroredStrategy comparison needs that).
    """
    return kf.FusionModel(
        inputs=keras.Input((8, 3), name="signal"),
        branches=[
            kf.branches.CNN(filters=(8,), kernel_size=3),
            kf.branches.RNN(units=8, cell="gru"),
            kf.branches.Transformer(dim=8, depth=1, num_heads=2),
        ],
        fusion="gated",
        head=kf.heads.Classification(3),
    )
