"""Fusion kinds: the full FusionModel's step time with each fusion against concat."""

from _models import data, kfusion_model
from _timing import interleave, keras_stepper, summarise, table

NAME = "fusion_kinds"


def measure(rounds, steps, done):
    x, y = data()
    kinds = ["concat", "weighted", "attention", "gated", "low_rank", "cross_attention"]
    runners = {k: keras_stepper(kfusion_model(k), x, y) for k in kinds}
    # Twice the rounds: the differences sought (a few percent) are the size of the noise.
    result = summarise(interleave(runners, 2 * rounds, steps), "concat")
    # FiLM fuses exactly two branches (one conditions the other): its own two-branch pair.
    pair = ("transformer", "cnn")
    runners = {k: keras_stepper(kfusion_model(k, pair), x, y) for k in ("concat", "film")}
    pair_result = summarise(interleave(runners, rounds, steps), "concat")
    result["concat (Transformer, CNN only)"] = pair_result["concat"]
    result["film (Transformer conditioned on CNN)"] = pair_result["film"]
    return result


INTRO = """\
## Fusion kinds: step time relative to concat (target <= 1.05 for attention and gated)"""


def markdown(result):
    return f"{INTRO}\n\n{table(result)}"
