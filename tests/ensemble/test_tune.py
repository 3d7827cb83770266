import sys

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion import tune
from kfusion.datasets import sequence_classification
from tests.conftest import BACKEND

kt = pytest.importorskip("keras_tuner", reason="keras-tuner (optional extra) not installed")
only_tensorflow = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="keras-tuner imports tensorboard only on TensorFlow"
)


def _hp(**fixed):
    hp = kt.HyperParameters()
    for name, value in fixed.items():
        hp.Fixed(name, value)
    return hp


def test_short_search_runs_end_to_end(tmp_path):
    x, y = sequence_classification(n=48, length=16, features=4, seed=0)
    hypermodel = tune.hypermodel(
        (16, 4), num_classes=3, branches=("cnn", "rnn"), widths=(8,), depths=(1,)
    )
    tuner = kt.RandomSearch(
        hypermodel,
        objective="val_accuracy",
        max_trials=2,
        directory=str(tmp_path),
        project_name="search",
        seed=0,
    )
    tuner.search(x[:32], y[:32], validation_data=(x[32:], y[32:]), epochs=1, verbose=0)
    trials = tuner.oracle.get_best_trials(num_trials=2)
    assert len(trials) == 2
    assert all(t.score is not None and 0.0 <= t.score <= 1.0 for t in trials)
    best = tuner.get_best_models(1)[0]
    assert isinstance(best, kf.FusionModel)
    assert best.predict(x[:4], verbose=0).shape == (4, 3)


def test_space_covers_branches_fusion_width_depth_rate():
    hypermodel = tune.hypermodel((16, 4), num_classes=3, fusions=("concat", "gated"))
    hp = kt.HyperParameters()
    hypermodel.build(hp)
    space = {p.name: p for p in hp.space}
    assert sorted(space) == [
        "depth",
        "fusion",
        "learning_rate",
        "use_cnn",
        "use_rnn",
        "use_transformer",
        "width",
    ]
    assert list(space["fusion"].values) == ["concat", "gated"]
    assert list(space["width"].values) == [8, 16, 32, 64]
    assert (space["learning_rate"].min_value, space["learning_rate"].max_value) == (1e-4, 1e-2)
    assert space["learning_rate"].sampling == "log"


def test_chosen_values_build_that_model():
    hypermodel = tune.hypermodel((16, 4), num_classes=3)
    hp = _hp(use_cnn=True, use_rnn=False, use_transformer=True, fusion="gated")
    hp.Fixed("width", 16)
    hp.Fixed("depth", 2)
    hp.Fixed("learning_rate", 3e-3)
    model = hypermodel.build(hp)
    kinds = [type(b).__name__ for b in model.branch_layers]
    assert kinds == ["CNN", "Transformer"]
    assert model.fusion_kind == "gated"
    cnn, transformer = model.branch_layers
    assert cnn.filters == (16, 16) and (transformer.dim, transformer.depth) == (16, 2)
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(3e-3)
    assert model.compiled


def test_no_branch_chosen_uses_the_first_and_vectors_use_mlp():
    hypermodel = tune.hypermodel((6,), num_classes=2)
    model = hypermodel.build(_hp(use_mlp=False))
    assert [type(b).__name__ for b in model.branch_layers] == ["MLP"]
    assert model.fusion_layer is None and model.output_shape == (None, 1)


def test_token_inputs():
    hypermodel = tune.hypermodel((10,), num_classes=4, input_dtype="int32", vocab_size=20)
    model = hypermodel.build(_hp(use_cnn=False, use_transformer=False, width=8))
    tokens = np.random.default_rng(0).integers(1, 20, size=(2, 10)).astype("int32")
    assert model.predict(tokens, verbose=0).shape == (2, 4)
    assert model.branch_layers[0].vocab_size == 20


def test_missing_keras_tuner_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_tuner", None)
    with pytest.raises(ImportError, match="pip install keras-tuner"):
        tune.hypermodel((16, 4), num_classes=3)


@only_tensorflow
def test_missing_tensorboard_on_tensorflow_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        tune.hypermodel((16, 4), num_classes=3)


BAD_ARGUMENTS = [
    ({"input_shape": (0,)}, r"input_shape=\(0,\)"),
    ({"input_shape": (2, 3, 4, 5)}, r"input_shape=\(2, 3, 4, 5\)"),
    ({"input_shape": "16x4"}, "input_shape='16x4'"),
    ({"num_classes": 0}, "num_classes=0"),
    ({"branches": ["gru"]}, r"branches=\['gru'\]"),
    ({"branches": ["mlp"]}, r"cannot take sequence inputs. Received: branches=\['mlp'\]"),
    ({"fusions": ["film"]}, r"fusions=\['film'\]"),
    ({"fusions": []}, r"fusions=\[\]"),
    ({"widths": 0}, "widths=0"),
    ({"depths": []}, r"depths=\[\]"),
    ({"learning_rate": (1e-2, 1e-4)}, r"learning_rate=\(0\.01, 0\.0001\)"),
    ({"learning_rate": 1e-3}, r"learning_rate=0\.001"),
    ({"input_dtype": "nope"}, "input_dtype='nope'"),
    ({"vocab_size": 1}, "vocab_size=1"),
    # dtype and vocab_size must agree, or every trial would fail in build().
    ({"input_shape": (12,), "vocab_size": 50}, "input_dtype='float32'"),
    ({"input_shape": (12,), "input_dtype": "int32"}, "input_dtype='int32'"),
    ({"input_dtype": "int32"}, "input_dtype='int32'"),
    ({"input_dtype": "int32", "vocab_size": 50}, "vocab_size=50"),
]


def test_bad_arguments():
    for kwargs, pattern in BAD_ARGUMENTS:
        args = {"input_shape": (16, 4), "num_classes": 3, **kwargs}
        with pytest.raises(ValueError, match=pattern):
            tune.hypermodel(**args)
