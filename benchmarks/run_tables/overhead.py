"""Overhead: the FusionModel against the same graph written by hand in Keras."""

from _models import data, hand_model, kfusion_model
from _timing import interleave, keras_stepper, summarise, table

NAME = "overhead"


def measure(rounds, steps, done):
    x, y = data()
    import keras

    keras.utils.set_random_seed(0)
    runners = {
        "hand-written keras": keras_stepper(hand_model(), x, y),
        "kfusion FusionModel": keras_stepper(kfusion_model("concat"), x, y),
    }
    return summarise(interleave(runners, rounds, steps), "hand-written keras")


def markdown(result):
    return f"""## Overhead: FusionModel vs the same graph written by hand (target ratio <= 1.03)

{table(result)}"""
