import importlib.util
import io
import os
import shutil
import sys

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion import inspect as kinspect


def _two_view_data(n=400, seed=0):
    """Two inputs: `signal` decides the label, `noise` is unrelated to it."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, 6)).astype("float32")
    noise = rng.normal(size=(n, 6)).astype("float32")
    y = (signal[:, 0] + signal[:, 1] > 0).astype("int32")
    return {"signal": signal, "noise": noise}, y


def _trained(fusion):
    x, y = _two_view_data()
    model = kf.FusionModel(
        inputs={"signal": keras.Input((6,)), "noise": keras.Input((6,))},
        branches={
            "signal": [kf.branches.MLP(units=(16,), name="signal_mlp")],
            "noise": [kf.branches.MLP(units=(16,), name="noise_mlp")],
        },
        fusion=fusion,
        head=kf.heads.Classification(2),
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(x, y, epochs=15, batch_size=32, verbose=0)
    return model, x, y


@pytest.mark.parametrize("fusion", ["attention", "gated"])
def test_ablation_finds_the_informative_branch(fusion):
    model, x, y = _trained(fusion)
    report = kinspect.ablation(model, x, y)
    assert report["metric"] == "accuracy"
    assert report["baseline"] > 0.9
    drops = {k: v["drop"] for k, v in report["branches"].items()}
    # Removing the informative branch costs a lot; removing the noise branch almost nothing.
    assert drops["signal/signal_mlp"] > 0.25
    assert abs(drops["noise/noise_mlp"]) < 0.1


def test_branch_weights_rows_sum_to_one_and_favour_signal():
    model, x, _ = _trained("attention")
    weights = kinspect.branch_weights(model, x)
    assert weights["branches"] == ["signal/signal_mlp", "noise/noise_mlp"]
    assert weights["per_sample"].shape == (400, 2)
    np.testing.assert_allclose(weights["per_sample"].sum(axis=1), 1.0, atol=1e-5)
    assert set(weights["mean"]) == set(weights["branches"])


def test_branch_weights_of_gated_fusion_average_gates():
    model, x, _ = _trained("gated")
    weights = kinspect.branch_weights(
        model, x[:7] if not isinstance(x, dict) else {k: v[:7] for k, v in x.items()}
    )
    assert weights["per_sample"].shape == (7, 2)
    np.testing.assert_allclose(weights["per_sample"].sum(axis=1), 1.0, atol=1e-5)


def test_ablation_with_token_level_fusion_keeps_masks():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 20, size=(32, 8)).astype("int32")
    tokens[:, 5:] = 0
    table = rng.normal(size=(32, 3)).astype("float32")
    model = kf.FusionModel(
        inputs={"text": keras.Input((8,), dtype="int32"), "table": keras.Input((3,))},
        branches={
            "text": [
                kf.branches.Transformer(dim=8, depth=1, num_heads=2, vocab_size=20, pooling=None)
            ],
            "table": [kf.branches.MLP(units=(8,))],
        },
        fusion="cross_attention",
        head=kf.heads.Classification(2),
    )
    report = kinspect.ablation(model, {"text": tokens, "table": table}, np.arange(32) % 2)
    assert len(report["branches"]) == 2
    with pytest.raises(ValueError, match="ablation"):
        kinspect.branch_weights(model, {"text": tokens, "table": table})


def test_branch_weights_rejects_models_without_weights():
    model = kf.FusionModel(
        inputs=keras.Input((6,)),
        branches=[kf.branches.MLP(units=(4,)), kf.branches.MLP(units=(4,))],
        fusion="concat",
    )
    with pytest.raises(ValueError, match="ConcatFusion.*ablation"):
        kinspect.branch_weights(model, np.ones((2, 6), "float32"))
    single = kf.FusionModel(inputs=keras.Input((6,)), branches=[kf.branches.MLP()])
    with pytest.raises(ValueError, match="two or more branches"):
        kinspect.ablation(single, np.ones((2, 6), "float32"), np.zeros(2))


def test_plot_degrades_with_a_clear_message(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise ImportError("You must install pydot")

    monkeypatch.setattr(keras.utils, "model_to_dot", missing)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    model = kf.FusionModel(inputs=keras.Input((6,)), branches=[kf.branches.MLP()])
    assert kinspect.plot(model, tmp_path / "x.png") is None
    assert "pydot" in err.getvalue() and "graphviz" in err.getvalue().lower()
    assert not (tmp_path / "x.png").exists()


class _DotWithoutGraphviz:
    """What `model_to_dot` returns when pydot is installed but not the `dot` program."""

    def write(self, path, format="png"):
        with open(path, "wb") as f:
            f.write(b"half")  # whatever a failed drawing left behind
        raise FileNotFoundError('"dot" not found in path.')


def test_plot_without_the_dot_program_keeps_an_earlier_image(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(keras.utils, "model_to_dot", lambda *a, **k: _DotWithoutGraphviz())
    image = tmp_path / "x.png"
    image.write_bytes(b"earlier image")
    model = kf.FusionModel(inputs=keras.Input((6,)), branches=[kf.branches.MLP()])
    assert kinspect.plot(model, image) is None
    assert "Graphviz" in capsys.readouterr().err
    assert image.read_bytes() == b"earlier image"
    assert os.listdir(tmp_path) == ["x.png"]


# .ci/run sets it where it installed Graphviz: there the picture tests must run, not skip.
GRAPHVIZ_REQUIRED = os.environ.get("KFUSION_REQUIRE_GRAPHVIZ") == "1"


def _has_graphviz():
    return importlib.util.find_spec("pydot") is not None and shutil.which("dot") is not None


def _needs_graphviz():
    if not _has_graphviz():
        if GRAPHVIZ_REQUIRED:
            pytest.fail("KFUSION_REQUIRE_GRAPHVIZ=1, but pydot or the Graphviz `dot` is missing")
        pytest.skip("needs pydot and the Graphviz `dot` program (without them, the message)")


def test_plot_without_graphviz_says_how_to_get_it(tmp_path, capsys):
    # On a machine without Graphviz (a user's fresh one): one line, no image, no failure.
    if _has_graphviz():
        pytest.skip("Graphviz is installed here (the message is also tested with a stub)")
    model = kf.FusionModel(inputs=keras.Input((6,)), branches=[kf.branches.MLP()])
    assert kinspect.plot(model, tmp_path / "m.png") is None
    assert kinspect.GRAPHVIZ_HINT in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_plot_draws_the_graph(tmp_path):
    _needs_graphviz()
    model = kf.FusionModel(
        inputs=keras.Input((16, 4), name="signal"),
        branches=[kf.branches.CNN(filters=(8,)), kf.branches.RNN(units=8)],
        fusion="gated",
        head=kf.heads.Classification(3),
    )
    path = tmp_path / "arch.png"
    assert kinspect.plot(model, path) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


@pytest.mark.parametrize("name", ["m.svg", "m.png"])
def test_plot_writes_svg_and_png(tmp_path, name):
    # keras' plot_model raises after writing an .svg when IPython is installed.
    _needs_graphviz()
    model = kf.FusionModel(inputs=keras.Input((6,)), branches=[kf.branches.MLP()])
    assert kinspect.plot(model, tmp_path / name) == str(tmp_path / name)
    assert os.listdir(tmp_path) == [name] and (tmp_path / name).stat().st_size > 0


def test_bad_arguments_name_the_argument(tmp_path):
    model, x, y = _trained("attention")
    rows = {k: v[:5] for k, v in x.items()}
    with pytest.raises(ValueError, match="Received: batch_size=0"):
        kinspect.branch_weights(model, rows, batch_size=0)
    with pytest.raises(ValueError, match=r"'signal' expects arrays of shape \(None, 6\)"):
        kinspect.branch_weights(model, {**rows, "signal": rows["signal"][:, :4]})
    with pytest.raises(ValueError, match=r"one target per sample of `x` \(5 rows\).*\(3,\)"):
        kinspect.ablation(model, rows, y[:3])
    with pytest.raises(ValueError, match=r"labels y.*must be in \[0, 1\]"):
        kinspect.ablation(model, rows, y[:5] + 2)
    with pytest.raises(ValueError, match="Received: model=None"):
        kinspect.branch_labels(None)
    with pytest.raises(ValueError, match="Received: dpi='high'"):
        kinspect.plot(model, tmp_path / "m.png", dpi="high")
    with pytest.raises(ValueError, match="Received: model=None"):
        kinspect.plot(None, tmp_path / "m.png")
    assert os.listdir(tmp_path) == []
