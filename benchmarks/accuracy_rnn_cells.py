"""RNN cells on the public time-series sets: minGRU and minLSTM against LSTM, same recipe.

The RNN branch alone (`kf.branches.RNN(units=64, cell=...)`, cells `"lstm"`, `"mingru"`,
`"minlstm"`) + the classification head, trained with the one recipe of
`benchmarks/accuracy.py` (its `build` and `run_keras` are reused as they are: inputs
standardised in the graph, padding masked on unequal lengths, `kf.recipes.small_data` with
every choice on a stratified validation split of TRAIN; TEST scored once at the end), on its
four UCR/UEA sets, three seeds.

    python benchmarks/accuracy_rnn_cells.py --threads 1    # every set, cell and seed (resumes)
    python benchmarks/accuracy_rnn_cells.py --render       # rewrite the section from the json

Results go to benchmarks/accuracy_rnn_cells.json one run at a time (a run already there is
skipped); the table is the marked section `rnn_cells` of benchmarks/ACCURACY.md
(`_marked.write_section`). `accuracy.py` rewrites ACCURACY.md whole: run this script's
`--render` after it to put the section back.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import accuracy  # noqa: E402
from _marked import write_section  # noqa: E402

import kfusion as kf  # noqa: E402

OUT = os.path.join(HERE, "accuracy_rnn_cells.json")
CELLS = {
    "rnn_lstm": ("LSTM 64", "lstm"),
    "rnn_mingru": ("minGRU 64", "mingru"),
    "rnn_minlstm": ("minLSTM 64", "minlstm"),
}
TOLERANCE = 0.01  # minGRU / minLSTM within 1 point of the LSTM branch
NOTE = """
Reading the table: the three LSTM rows repeat the `LSTM 64 alone` row above to the last
digit (same seeds, same recipe), so the runs are reproducible. On the two univariate sets
(GunPoint, ItalyPowerDemand: one channel) minGRU stays at chance, and so does minLSTM except
one ItalyPowerDemand seed (0.789): early stopping ends most of these runs 20 epochs after a
best epoch between 1 and 9, and on ItalyPowerDemand (seed 0, 30
epochs of the recipe) the training loss of minGRU stays at ln 2 = 0.693 while the LSTM's
falls. Their gradients match central finite differences (checked on the layer), so this
is the optimisation, not a wrong gradient: with one input channel every gate and
candidate is a function of the single number x_t, and at initialisation the branch's
final states differ across the training series by about 0.01 (std over series, mean over
units), so the head starts with almost no signal. On the multivariate sets (BasicMotions,
6 channels; JapaneseVowels, 12 channels, masked padding) both cells are at or above the
LSTM. Not tried here (the one-recipe rule): deeper minGRU stacks, other gate
initialisations or learning rates for univariate series.
"""


def _register():
    """Add the three cells to accuracy.py's branch table (this process only)."""
    for key, (label, cell) in CELLS.items():
        accuracy.BRANCHES[key] = (
            label,
            lambda cell=cell, key=key: kf.branches.RNN(units=64, cell=cell, name=key),
        )


def render(results, note=""):
    summary = accuracy.summarise(results)
    head = results.get("header", {})
    names = [d for d in accuracy.DATASETS if d in summary]
    lines = [
        "## RNN cells: minGRU and minLSTM against LSTM",
        "",
        "Written by `python benchmarks/accuracy_rnn_cells.py --threads 1` (raw runs: "
        "`benchmarks/accuracy_rnn_cells.json`; `--render` rewrites this section from them; "
        "`accuracy.py` rewrites this file whole, so run `--render` here after it). "
        f"Machine: {head.get('machine', '?')}, keras {head.get('keras', '?')}, TensorFlow "
        f"{head.get('tensorflow', '?')}; run on {head.get('date', '?')} with "
        f"{head.get('threads', '?')} TensorFlow thread(s) per model, the cores shared with "
        "other work while it ran (wall time is therefore inflated; the CPU time of the "
        "one-thread process is shown beside it).",
        "",
        "`kf.branches.RNN(units=64, cell=...)` alone + the classification head, the same "
        "recipe as the table above (`accuracy.build` and `accuracy.run_keras`, reused "
        'unchanged: `normalize="adapt"`, masks on JapaneseVowels\' padding, '
        "`kf.recipes.small_data` with Adam 1e-3, at most 100 epochs, patience 20, every "
        "choice on a stratified 20% validation split of TRAIN). minGRU and minLSTM use "
        "their default chrono initialisation of the gate biases. Mean +- std of TEST "
        "accuracy over the seeds in `n`; time: mean per model, CPU s / wall s.",
        "",
        "| cell | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, (label, _) in CELLS.items():
        cells = []
        for name in names:
            s = summary[name].get(key)
            cells.append(
                "-"
                if s is None
                else f"{accuracy._fmt(s)} ({s['seconds']:.0f} / {s['wall_seconds']:.0f} s, "
                f"n={s['n']})"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Target (issue: minGRU / minLSTM within 1 point of the LSTM branch, mean TEST "
        "accuracy >= LSTM's - 0.01):",
        "",
        "| dataset | minGRU | minLSTM |",
        "|---|---|---|",
    ]
    verdicts = {}
    for name in names:
        lstm = summary[name].get("rnn_lstm")
        row = []
        for key in ("rnn_mingru", "rnn_minlstm"):
            s = summary[name].get(key)
            if s is None or lstm is None:
                row.append("-")
                continue
            ok = s["mean"] >= lstm["mean"] - TOLERANCE - 1e-9
            verdicts[(name, key)] = ok
            diff = 100 * (s["mean"] - lstm["mean"])
            row.append(
                ("met" if ok else "**missed**")
                + f" ({s['mean']:.3f} vs {lstm['mean']:.3f}, {diff:+.1f} points)"
            )
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    met = sum(verdicts.values())
    lines += ["", f"Met in {met} of {len(verdicts)} (dataset, cell) pairs."]
    if note:
        lines += ["", note.strip()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(accuracy.DATASETS))
    parser.add_argument("--models", default=",".join(CELLS))
    parser.add_argument("--seeds", default=",".join(map(str, accuracy.SEEDS)))
    parser.add_argument("--force", action="store_true", help="rerun runs already in the json")
    parser.add_argument("--render", action="store_true", help="only rewrite the section")
    parser.add_argument("--out", default=OUT, help="the results json (default: %(default)s)")
    parser.add_argument("--max-epochs", type=int, default=None, help="smoke runs only")
    parser.add_argument(
        "--threads", type=int, default=0, help="TensorFlow threads per process (0: all)"
    )
    args = parser.parse_args(argv)
    _register()
    accuracy.OUT = args.out
    accuracy.THREADS = args.threads or os.cpu_count()
    if args.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.render:
        results = accuracy._load_results()
    else:
        models = [m for m in args.models.split(",") if m]
        unknown = [m for m in models if m not in CELLS]
        if unknown:
            parser.error(f"unknown model(s) {unknown}; known: {', '.join(CELLS)}")
        start = time.perf_counter()
        results = accuracy.run(
            [d for d in args.datasets.split(",") if d],
            models,
            [int(s) for s in args.seeds.split(",") if s],
            force=args.force,
            max_epochs=args.max_epochs,
        )
        print(f"whole run: {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    text = render(results, NOTE)
    if args.out == OUT:
        write_section(accuracy.MARKDOWN, "rnn_cells", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
