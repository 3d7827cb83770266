"""The FusionModel on TensorFlow (graph, and XLA) against the same network in plain PyTorch."""

from _models import data, kfusion_model
from _timing import interleave, keras_stepper, summarise, table, torch_process

NAME = "vs_pytorch"


def measure(rounds, steps, done):
    x, y = data()
    runners = {
        "kfusion (TensorFlow, Keras default: no XLA on CPU)": keras_stepper(kfusion_model(), x, y),
        "kfusion (TensorFlow, jit_compile=True)": keras_stepper(
            kfusion_model(), x, y, jit_compile=True
        ),
        "PyTorch eager": torch_process(),
    }
    compiled_note = None
    try:
        runners["PyTorch torch.compile"] = torch_process(compile_model=True)
    except Exception as e:  # noqa: BLE001 - record why compile is unavailable here
        compiled_note = f"torch.compile failed here: {type(e).__name__}: {str(e)[:200]}"
    result = summarise(interleave(runners, rounds, steps), "PyTorch eager")
    if compiled_note:
        result["note"] = compiled_note
    return result


def markdown(result):
    return f"""## vs PyTorch on CPU (target: kfusion >= 1.2x PyTorch eager samples/s)

{table(result)}
{result.get("note", "")}"""
