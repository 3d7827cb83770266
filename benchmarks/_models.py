"""The network the speed tables time: kfusion's FusionModel, the same graph in plain Keras and
in plain PyTorch, and the random data they train on."""

T, F, BATCH, CLASSES = 64, 32, 64, 10


def data(n=BATCH * 8, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, T, F)).astype("float32")
    y = rng.integers(0, CLASSES, size=(n,)).astype("int32")
    return x, y


def kfusion_model(fusion="concat", branches=("cnn", "rnn", "transformer")):
    import keras

    import kfusion as kf

    make = {
        "cnn": lambda: kf.branches.CNN(filters=(64, 64), kernel_size=3),
        "rnn": lambda: kf.branches.RNN(units=64, cell="lstm"),
        "transformer": lambda: kf.branches.Transformer(
            dim=64, depth=2, num_heads=4, intermediate_dim=128
        ),
    }
    return kf.FusionModel(
        inputs=keras.Input((T, F), name="signal"),
        branches=[make[b]() for b in branches],
        fusion=fusion,
        head=kf.heads.Classification(CLASSES),
    )


def hand_model():
    """The same network as `kfusion_model("concat")`, written with plain keras layers."""
    import keras
    from keras import layers

    inp = keras.Input((T, F))
    c = layers.Conv1D(64, 3, padding="same", activation="relu")(inp)
    c = layers.Conv1D(64, 3, padding="same", activation="relu")(c)
    c = layers.GlobalAveragePooling1D()(c)
    r = layers.LSTM(64)(inp)
    t = layers.Dense(64)(inp)
    t = PositionAdd(T)(t)
    for _ in range(2):
        h = layers.LayerNormalization(epsilon=1e-6)(t)
        h = layers.MultiHeadAttention(4, 16)(h, h)
        t = t + h
        h = layers.LayerNormalization(epsilon=1e-6)(t)
        h = layers.Dense(128, activation="gelu")(h)
        h = layers.Dense(64)(h)
        t = t + h
    t = layers.LayerNormalization(epsilon=1e-6)(t)
    t = layers.GlobalAveragePooling1D()(t)
    fused = layers.Concatenate()([c, r, t])
    out = layers.Dense(CLASSES, activation="softmax")(fused)
    return keras.Model(inp, out)


def _position_add_class():
    import keras

    class _PositionAdd(keras.layers.Layer):
        def __init__(self, length, **kwargs):
            super().__init__(**kwargs)
            self.length = length

        def build(self, shape):
            self.table = self.add_weight(shape=(self.length, shape[-1]), name="table")

        def call(self, x):
            return x + self.table[None, : keras.ops.shape(x)[1]]

    return _PositionAdd


def PositionAdd(length):  # noqa: N802 - reads like a layer
    return _position_add_class()(length)


def torch_model(branches=("cnn", "rnn", "transformer")):
    """The network in plain PyTorch; `branches` picks a subset (each alone: its own head)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1 = nn.LayerNorm(64, eps=1e-6)
            self.att = nn.MultiheadAttention(64, 4, batch_first=True)
            self.n2 = nn.LayerNorm(64, eps=1e-6)
            self.ff = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))

        def forward(self, x):
            h = self.n1(x)
            x = x + self.att(h, h, h, need_weights=False)[0]
            return x + self.ff(self.n2(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if "cnn" in branches:
                self.c1 = nn.Conv1d(F, 64, 3, padding=1)
                self.c2 = nn.Conv1d(64, 64, 3, padding=1)
            if "rnn" in branches:
                self.lstm = nn.LSTM(F, 64, batch_first=True)
            if "transformer" in branches:
                self.proj = nn.Linear(F, 64)
                self.pos = nn.Parameter(torch.zeros(T, 64))
                self.blocks = nn.ModuleList([Block(), Block()])
                self.norm = nn.LayerNorm(64, eps=1e-6)
            self.head = nn.Linear(64 * len(branches), CLASSES)

        def forward(self, x):
            features = []
            if "cnn" in branches:
                c = torch.relu(self.c2(torch.relu(self.c1(x.transpose(1, 2)))))
                features.append(c.mean(-1))
            if "rnn" in branches:
                features.append(self.lstm(x)[0][:, -1])
            if "transformer" in branches:
                t = self.proj(x) + self.pos
                for b in self.blocks:
                    t = b(t)
                features.append(self.norm(t).mean(1))
            return self.head(torch.cat(features, -1))

    return Net()


def hand_branch_model(branch):
    """One branch of `hand_model` alone, with its own Dense head (for the per-branch table)."""
    import keras

    model = hand_model()
    index = {"cnn": 0, "rnn": 1, "transformer": 2}[branch]
    concat = next(layer for layer in model.layers if isinstance(layer, keras.layers.Concatenate))
    feature = concat.input[index]
    out = keras.layers.Dense(CLASSES, activation="softmax")(feature)
    return keras.Model(model.input, out)
