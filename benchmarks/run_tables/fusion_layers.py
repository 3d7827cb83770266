"""Each fusion layer alone on three 64-wide features: its own cost, isolated from the branches."""

from _models import BATCH, CLASSES
from _timing import interleave, keras_stepper, summarise, table

NAME = "fusion_layers"
NEEDS = ("fusion_kinds",)  # the full model's concat step, for `implied_ratio`
FUSION_LAYER_COLS = ("median_ms", "added_ms", "implied_ratio")


def fusion_layer_model(kind):
    """The fusion layer alone on three 64-wide branch features (FiLM: two), with a Dense head."""
    import keras

    from kfusion.models._factory import make_fusion

    features = [keras.Input((64,)) for _ in range(2 if kind == "film" else 3)]
    fused = make_fusion(kind, [64] * len(features))(features)
    return keras.Model(features, keras.layers.Dense(CLASSES, activation="softmax")(fused))


def measure(rounds, steps, done):
    """Each fusion layer's own training-step cost, isolated from the branches.

    In the full model the few-percent differences between fusion kinds are the size of the
    run-to-run noise; alone, each layer's cost is measured to a fraction of a millisecond.
    `implied_ratio` adds that cost (over concat's) to the full model's concat step.
    """
    import numpy as np

    step_ms = done["fusion_kinds"]["concat"]["median_ms"]
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(BATCH * 8, 64)).astype("float32") for _ in range(3)]
    y = rng.integers(0, CLASSES, size=BATCH * 8).astype("int32")
    kinds = ["concat", "weighted", "attention", "gated", "low_rank", "cross_attention", "film"]
    runners = {
        k: keras_stepper(fusion_layer_model(k), x[:2] if k == "film" else x, y) for k in kinds
    }
    result = summarise(interleave(runners, rounds, 5 * steps), "concat")
    base = result["concat"]["median_ms"]
    for r in result.values():
        r["added_ms"] = r["median_ms"] - base
        r["implied_ratio"] = (step_ms + r["added_ms"]) / step_ms
    return result


INTRO = f"""\
Each fusion layer alone (three 64-wide features, batch {BATCH}, a Dense head; `added_ms` over
concat's step; `implied_ratio` = full-model step with that cost added to concat's step above):"""


def markdown(result):
    return f"{INTRO}\n\n{table(result, cols=FUSION_LAYER_COLS)}"
