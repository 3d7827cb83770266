"""`FusionModel.serve`: the compiled fast path for one sample or a small batch."""

import keras
import numpy as np
import pytest

import kfusion as kf


def _model():
    return kf.FusionModel(
        inputs={"signal": keras.Input((6, 3)), "table": keras.Input((4,))},
        branches={
            "signal": [kf.branches.CNN(filters=(4,))],
            "table": [kf.branches.MLP(units=(4,))],
        },
        fusion="gated",
        head=kf.heads.MultiTask(
            {"kind": kf.heads.Classification(3), "size": kf.heads.Regression()}
        ),
    )


def test_serve_matches_the_model_for_one_sample_and_small_batches():
    model = _model()
    rng = np.random.default_rng(0)
    for rows in (1, 3):
        x = {
            "signal": rng.normal(size=(rows, 6, 3)).astype("float32"),
            "table": rng.normal(size=(rows, 4)).astype("float32"),
        }
        expected = model(x, training=False)
        for jit_compile in (True, False):
            got = model.serve(x, jit_compile=jit_compile)
            assert sorted(got) == ["kind", "size"]
            for task in got:
                assert isinstance(got[task], np.ndarray)
                np.testing.assert_allclose(
                    got[task], keras.ops.convert_to_numpy(expected[task]), atol=1e-5
                )


def test_serve_checks_its_inputs_and_arguments():
    model = _model()
    with pytest.raises(ValueError, match="Missing input"):
        model.serve({"signal": np.zeros((1, 6, 3), "float32")})
    with pytest.raises(ValueError, match="Received: jit_compile="):
        model.serve({}, jit_compile="yes")
