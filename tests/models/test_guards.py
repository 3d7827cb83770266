"""FusionModel refuses sizes whose weights could not fit in memory, before allocating them,
naming the argument and the estimated size (kfusion.models._guards)."""

import keras
import pytest

import kfusion as kf
from kfusion.models import _guards

GIB = 2**30


@pytest.fixture(autouse=True)
def _eight_gib(monkeypatch):
    monkeypatch.setattr(_guards, "memory_bytes", lambda: 8 * GIB)


@pytest.mark.parametrize(
    "build, fragment",
    [
        (
            lambda: dict(branches=[kf.branches.MLP(units=(10**11,))]),
            r"`units`=100000000000 in branch 'mlp_branch' \(input 'x'\) makes at least 4e\+11",
        ),
        (
            lambda: dict(branches=[kf.branches.MLP()], head=kf.heads.Classification(10**9)),
            r"`num_classes`=1000000000 in head .* makes at least 6.4e\+10 parameters",
        ),
        (
            lambda: dict(
                branches=[kf.branches.MLP(units=(8,)), kf.branches.MLP()], fusion_units=10**9
            ),
            r"`units`=1000000000 in fusion",
        ),
    ],
)
def test_sizes_that_cannot_fit_are_refused(build, fragment):
    with pytest.raises(ValueError, match=fragment + ".*8.0 GB of memory"):
        kf.FusionModel(inputs=keras.Input((4,), name="x"), **build())


def test_a_vocabulary_that_cannot_fit_is_refused_and_a_large_one_builds():
    tokens = keras.Input((12,), dtype="int32", name="tokens")
    with pytest.raises(ValueError, match=r"`vocab_size`=10000000000 in branch 'cnn_branch'"):
        kf.FusionModel(inputs=tokens, branches=[kf.branches.CNN(filters=(8,), vocab_size=10**10)])
    # the token length does not multiply an embedding's size
    model = kf.FusionModel(
        inputs=keras.Input((4096,), dtype="int32", name="tokens"),
        branches=[kf.branches.CNN(filters=(8,), vocab_size=50_000, embedding_dim=8)],
    )
    assert model.count_params() > 400_000


def test_an_input_named_empty_is_refused_in_a_spec():
    with pytest.raises(ValueError, match="Input names must be non-empty strings. Received: ''"):
        kf.FusionModel.from_spec({"inputs": {"": {"shape": [4]}}, "branches": [{"type": "MLP"}]})
