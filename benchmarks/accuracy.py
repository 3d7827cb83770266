"""Accuracy on public time-series benchmarks: kfusion's branches alone and fused vs MiniRocket.

The UCR/UEA sets that `aeon` bundles (`kf.datasets.ucr`, official TRAIN/TEST split, nothing
downloads), one recipe for every dataset and model (the constants below), every choice made
on a validation split of TRAIN (`kf.recipes.small_data`: stratified split, early stopping
and learning-rate schedule on its loss); TEST is only scored, once, at the end. MiniRocket
(Dempster et al. 2021) runs in the same script through aeon on the same split. Published
FCN / ResNet / InceptionTime accuracies are quoted with their source.

    python benchmarks/accuracy.py                 # every dataset, model and seed (resumes)
    python benchmarks/accuracy.py --datasets GunPoint --models fcn,minirocket --seeds 0
    python benchmarks/accuracy.py --render        # rewrite ACCURACY.md from the json files

Results go to benchmarks/accuracy.json one run at a time (a run already there is skipped,
so an interrupted script continues where it stopped); ACCURACY.md is rendered from it and
from benchmarks/accuracy_ensembles.json (the model-level table).
"""

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kfusion as kf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "accuracy.json")
MARKDOWN = os.path.join(HERE, "ACCURACY.md")

DATASETS = ("GunPoint", "ItalyPowerDemand", "BasicMotions", "JapaneseVowels")
SEEDS = (0, 1, 2)
# The one recipe: inputs standardised in the graph with statistics of the training part
# (`normalize="adapt"`), padding masked where a set has unequal lengths, Adam 1e-3,
# kf.recipes.small_data's schedule with these bounds.
MAX_EPOCHS = 100
PATIENCE = 20
# Epochs of flat validation loss before the learning rate halves (None: the recipe's
# default, PATIENCE // 4).
LR_PATIENCE = None
LEARNING_RATE = 1e-3
BRANCH_DROPOUT = 0.3
TIME_TARGET_S = 120.0
THREADS = os.cpu_count()

BRANCHES = {
    "fcn": ("FCN", lambda: kf.branches.FCN(name="fcn")),
    "inception": ("InceptionTime", lambda: kf.branches.InceptionTime(name="inception")),
    "lstm": ("LSTM 64", lambda: kf.branches.RNN(units=64, name="lstm")),
    "transformer": (
        "Transformer d64x2",
        lambda: kf.branches.Transformer(dim=64, depth=2, num_heads=4, name="transformer"),
    ),
}
# Fused models: (label, branches, fusion).
FUSED = {
    "fused_concat": ("fused concat", ("fcn", "inception"), "concat"),
    "fused_attention": ("fused attention", ("fcn", "inception"), "attention"),
    "fused_gated": ("fused gated", ("fcn", "inception"), "gated"),
    "fused_mixed": ("fused concat", ("fcn", "lstm", "transformer"), "concat"),
}
# The same fused models with each branch's features layer-normalised before the fusion.
FUSED.update(
    {
        f"{key}_ln": (f"{label} + feature norm", names, fusion)
        for key, (label, names, fusion) in list(FUSED.items())
        if key in ("fused_gated", "fused_mixed")
    }
)
MODELS = tuple(BRANCHES) + tuple(FUSED) + ("minirocket",)

# Published test accuracies (mean over the papers' runs), with their source files.
PUBLISHED = {
    "GunPoint": {"FCN": 1.000, "ResNet": 0.991, "InceptionTime": 1.000},
    "ItalyPowerDemand": {"FCN": 0.963, "ResNet": 0.962, "InceptionTime": 0.965},
    "BasicMotions": {"InceptionTime": 1.000},
    "JapaneseVowels": {"FCN": 0.993, "ResNet": 0.992, "InceptionTime": 0.992},
}
PUBLISHED_SOURCES = {
    "FCN, ResNet (GunPoint, ItalyPowerDemand)": "Ismail Fawaz et al. 2019, *Deep learning "
    "for time series classification: a review*, UCR 2018 archive, mean of 5 runs "
    "(github.com/hfawaz/dl-4-tsc, results/results-ucr-128.csv)",
    "FCN, ResNet (JapaneseVowels)": "same paper, Baydogan's MTS archive, mean of 10 runs "
    "(results/results-mts.csv); the paper has no BasicMotions result",
    "InceptionTime": "Ismail Fawaz et al. 2020, *InceptionTime: Finding AlexNet for time "
    "series classification*, the 5-network ensemble, UCR 2018 and UEA 2018 archives "
    "(github.com/hfawaz/InceptionTime, results-InceptionTime-128.csv, results-mts.csv)",
}


def load(name):
    data = kf.datasets.ucr(name)
    unequal = bool(np.any(data["lengths_train"] != data["x_train"].shape[1])) or bool(
        np.any(data["lengths_test"] != data["x_test"].shape[1])
    )
    data["unequal"] = unequal
    return data


def build(key, data):
    length, channels = data["x_train"].shape[1:]
    if key in BRANCHES:
        branches, fusion, dropout = [BRANCHES[key][1]()], None, 0.0
    else:
        _, names, fusion = FUSED[key]
        branches, dropout = [BRANCHES[n][1]() for n in names], BRANCH_DROPOUT
    return kf.FusionModel(
        inputs=keras.Input((length, channels), name="series"),
        branches=branches,
        fusion=fusion,
        head=kf.heads.Classification(labels=data["classes"]),
        mask_value=0.0 if data["unequal"] else None,
        normalize="adapt",
        branch_dropout=dropout,
        feature_norm="layer" if key.endswith("_ln") else None,
        name=key,
    )


def run_keras(key, data, seed):
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = build(key, data)
    start, cpu_start = time.perf_counter(), time.process_time()
    history = kf.recipes.small_data(
        model,
        data["x_train"],
        data["y_train"],
        seed=seed,
        learning_rate=LEARNING_RATE,
        max_epochs=MAX_EPOCHS,
        patience=PATIENCE,
        lr_patience=LR_PATIENCE,
    )
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    predicted = model.predict_classes(data["x_test"], batch_size=256)
    return {
        "accuracy": float(np.mean(predicted == data["y_test"])),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "epochs": len(history.history["loss"]),
        "best_val_loss": float(min(history.history["val_loss"])),
        "best_val_accuracy": float(max(history.history["val_accuracy"])),
        "lr_patience": LR_PATIENCE or max(2, PATIENCE // 4),
        "params": int(model.count_params()),
    }


def run_minirocket(data, seed):
    from aeon.classification.convolution_based import MiniRocketClassifier

    # aeon takes (n, channels, length); unequal-length sets as the zero-padded arrays.
    x_train = np.transpose(data["x_train"], (0, 2, 1)).astype("float64")
    x_test = np.transpose(data["x_test"], (0, 2, 1)).astype("float64")
    # Warm-up, not timed: the first fit compiles MiniRocket's numba kernels (about a minute).
    MiniRocketClassifier(random_state=seed).fit(x_train, data["y_train"])
    start = time.perf_counter()
    model = MiniRocketClassifier(random_state=seed)
    model.fit(x_train, data["y_train"])
    seconds = time.perf_counter() - start
    predicted = model.predict(x_test)
    return {"accuracy": float(np.mean(predicted == data["y_test"])), "seconds": seconds}


def _load_results():
    if os.path.exists(OUT):
        with open(OUT, encoding="utf-8") as f:
            return json.load(f)
    return {"runs": []}


def _save(results):
    tmp = OUT + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, OUT)


def header():
    import tensorflow as tf

    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "backend": keras.config.backend(),
        "threads": THREADS,
        "recipe": {
            "max_epochs": MAX_EPOCHS,
            "patience": PATIENCE,
            "lr_patience": LR_PATIENCE or max(2, PATIENCE // 4),
            "learning_rate": LEARNING_RATE,
            "branch_dropout": BRANCH_DROPOUT,
            "validation_split": 0.2,
            "normalize": "adapt",
        },
    }


def run(datasets, models, seeds, force=False, max_epochs=None):
    global MAX_EPOCHS
    if max_epochs is not None:
        MAX_EPOCHS = max_epochs
    results = _load_results()
    results["header"] = header()
    done = {(r["dataset"], r["model"], r["seed"]) for r in results["runs"]}
    # Seeds outermost: a run cut short still has every model on every set at least once.
    loaded = {}
    for seed in seeds:
        for name in datasets:
            data = loaded[name] = loaded.get(name) or load(name)
            for key in models:
                if (name, key, seed) in done and not force:
                    continue
                if key == "minirocket":
                    row = run_minirocket(data, seed)
                else:
                    row = run_keras(key, data, seed)
                row.update(dataset=name, model=key, seed=seed)
                results["runs"] = [
                    r
                    for r in results["runs"]
                    if (r["dataset"], r["model"], r["seed"]) != (name, key, seed)
                ]
                results["runs"].append(row)
                _save(results)
                print(
                    f"{name:<18}{key:<18}seed {seed}  accuracy {row['accuracy']:.3f}  "
                    f"{row['seconds']:.1f} s"
                    + (f"  {row['epochs']} epochs" if "epochs" in row else ""),
                    flush=True,
                )
    return results


# ----------------------------------------------------------------------------- render
def _stats(runs):
    acc = np.array([r["accuracy"] for r in runs])
    # Time: CPU seconds of the one-thread run where recorded (the machine's wall clock
    # also counts other work sharing its cores), else wall seconds.
    sec = np.array([r.get("cpu_seconds", r["seconds"]) for r in runs])
    wall = np.array([r["seconds"] for r in runs])
    return {
        "mean": float(acc.mean()),
        "std": float(acc.std()),
        "n": len(acc),
        "seconds": float(sec.mean()),
        "max_seconds": float(sec.max()),
        "wall_seconds": float(wall.mean()),
    }


def _label(key):
    if key in BRANCHES:
        return f"{BRANCHES[key][0]} alone"
    if key in FUSED:
        label, names, _ = FUSED[key]
        return f"{label} ({' + '.join(BRANCHES[n][0] for n in names)})"
    return "MiniRocket (aeon)"


def summarise(results):
    table = {}
    for r in results["runs"]:
        table.setdefault(r["dataset"], {}).setdefault(r["model"], []).append(r)
    return {d: {m: _stats(rs) for m, rs in ms.items()} for d, ms in table.items()}


def targets(summary):
    """Per dataset and fused model: each of the issue's three targets, met or not."""
    out = {}
    for name, models in summary.items():
        peers = [models["minirocket"]["mean"]] if "minirocket" in models else []
        if PUBLISHED.get(name, {}).get("ResNet") is not None:
            peers.append(PUBLISHED[name]["ResNet"])
        bar = max(peers) - 0.01 if peers else None
        for key, (_, names, _) in FUSED.items():
            if key not in models:
                continue
            own = [models[n]["mean"] for n in names if n in models]
            fused = models[key]
            out[(name, key)] = {
                "peer_bar": bar,
                "vs_peers": None if bar is None else fused["mean"] >= bar - 1e-9,
                "best_branch": max(own) if own else None,
                "vs_branches": None if not own else fused["mean"] >= max(own) - 1e-9,
                "time": fused["max_seconds"] <= TIME_TARGET_S,
            }
    return out


def _fmt(stat):
    return f"{stat['mean']:.3f} +- {stat['std']:.3f}"


def render(results, ensembles_markdown=""):
    summary = summarise(results)
    head = results.get("header", {})
    recipe = head.get("recipe", {})
    lines = [
        "# Accuracy on public time-series benchmarks",
        "",
        "Written by `python benchmarks/accuracy.py` (rerun it to reproduce; `--render` "
        "rewrites this file from `accuracy.json`). Do not edit by hand.",
        "",
        f"Machine: {head.get('machine', '?')}; Python {head.get('python', '?')}, keras "
        f"{head.get('keras', '?')}, TensorFlow {head.get('tensorflow', '?')} (backend "
        f"{head.get('backend', '?')}); run on {head.get('date', '?')}.",
        "",
        "## Method",
        "",
        "- Data: the UCR/UEA sets bundled in `aeon` (`kf.datasets.ucr`), official TRAIN/TEST "
        "split. JapaneseVowels has unequal lengths (7-29 steps): padded with zeros and read "
        "with `mask_value=0.0`.",
        "- One recipe for every dataset and model, no per-dataset setting: inputs "
        "standardised inside the graph with per-channel statistics of the training part "
        f'(`normalize="adapt"`); `kf.recipes.small_data` with Adam {recipe.get("learning_rate")}, '
        f"at most {recipe.get('max_epochs')} epochs, early stopping after "
        f"{recipe.get('patience')} epochs without a better epoch, the best epoch's weights "
        "restored (`kf.callbacks.BestEpoch`: highest validation accuracy, ties broken by the "
        "lowest validation loss), learning rate halved after "
        f"{recipe.get('lr_patience', max(2, (recipe.get('patience') or 20) // 4))} epochs "
        "without a lower validation loss, batch size min(n/10, 16) (at least 8). The "
        "validation split is a seeded, stratified 20% "
        "of TRAIN; TEST is scored once, after training, and never used for a choice.",
        f"- Fused models use `branch_dropout={recipe.get('branch_dropout')}` (see below); the "
        "branch settings are the papers' defaults (FCN 128-256-128, ResNet 64-128-128, "
        "InceptionTime depth 6 x 32 filters) and LSTM 64, Transformer d64 x 2 blocks x 4 "
        "heads.",
        "- MiniRocket: `aeon.classification.convolution_based.MiniRocketClassifier` with "
        "its defaults (10,000 kernels, ridge classifier), same split, same seeds.",
        "- Mean +- std of TEST accuracy over the seeds shown in the `n` column; time is the "
        "mean CPU time of training (fit, including the validation passes) per model, each "
        f"model trained with {head.get('threads', '?')} TensorFlow thread(s); CPU time "
        "rather than wall time because the 2 cores were shared with other work while these "
        "ran (rows without a recorded CPU time show wall time).",
        "",
        "## Results",
        "",
    ]
    models = [m for m in MODELS if any(m in s for s in summary.values())]
    names = [d for d in DATASETS if d in summary]
    lines.append("| model | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for key in models:
        cells = []
        for name in names:
            stat = summary[name].get(key)
            cells.append(
                "-" if stat is None else f"{_fmt(stat)} ({stat['seconds']:.0f} s, n={stat['n']})"
            )
        lines.append(f"| {_label(key)} | " + " | ".join(cells) + " |")
    for model in ("FCN", "ResNet", "InceptionTime"):
        cells = []
        for name in names:
            value = PUBLISHED.get(name, {}).get(model)
            cells.append("-" if value is None else f"{value:.3f}")
        if any(c != "-" for c in cells):
            lines.append(f"| published {model} | " + " | ".join(cells) + " |")
    lines += ["", "Published numbers:"]
    for model, source in PUBLISHED_SOURCES.items():
        lines.append(f"- {model}: {source}")
    lines += ["", "## Targets", ""]
    lines.append(
        "| dataset | fused model | >= max(ResNet published, MiniRocket) - 0.01 | "
        ">= its best branch alone | <= 120 s per model |"
    )
    lines.append("|---|---|---|---|---|")
    for (name, key), t in targets(summary).items():
        fused = summary[name][key]["mean"]

        def mark(ok, detail):
            return "-" if ok is None else ("met" if ok else "**missed**") + f" ({detail})"

        lines.append(
            f"| {name} | {_label(key)} | "
            + mark(t["vs_peers"], f"{fused:.3f} vs {t['peer_bar']:.3f}" if t["peer_bar"] else "")
            + " | "
            + mark(
                t["vs_branches"],
                f"{fused:.3f} vs {t['best_branch']:.3f}" if t["best_branch"] is not None else "",
            )
            + " | "
            + mark(t["time"], f"max {summary[name][key]['max_seconds']:.0f} s")
            + " |"
        )
    notes = os.path.join(HERE, "ACCURACY_NOTES.md")
    if os.path.exists(notes):
        with open(notes, encoding="utf-8") as f:
            lines += ["", f.read().strip()]
    if ensembles_markdown:
        lines += ["", ensembles_markdown.strip()]
    return "\n".join(lines) + "\n"


def write_markdown(results):
    ensembles = ""
    path = os.path.join(HERE, "accuracy_ensembles.json")
    if os.path.exists(path):
        sys.path.insert(0, HERE)
        import accuracy_ensembles

        with open(path, encoding="utf-8") as f:
            ensembles = accuracy_ensembles.render(json.load(f))
    text = render(results, ensembles)
    # Sections other scripts write into this file (accuracy_rnn_cells.py) are kept.
    sys.path.insert(0, HERE)
    from _marked import read_sections

    kept = read_sections(MARKDOWN)
    tmp = MARKDOWN + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text.rstrip() + "\n")
        for name, body in kept:
            if f"<!-- section:{name} -->" in text:
                continue
            f.write(f"\n<!-- section:{name} -->\n{body}\n<!-- /section:{name} -->\n")
    os.replace(tmp, MARKDOWN)
    return MARKDOWN


def main(argv=None):
    global OUT, THREADS, LR_PATIENCE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--force", action="store_true", help="rerun runs already in the json")
    parser.add_argument("--render", action="store_true", help="only rewrite ACCURACY.md")
    parser.add_argument("--out", default=OUT, help="the results json (default: %(default)s)")
    parser.add_argument("--max-epochs", type=int, default=None, help="smoke runs only")
    parser.add_argument(
        "--threads", type=int, default=0, help="TensorFlow threads per process (0: all)"
    )
    parser.add_argument(
        "--lr-patience",
        type=int,
        default=None,
        help="epochs of flat validation loss before the learning rate halves "
        "(default: the recipe's, patience // 4)",
    )
    args = parser.parse_args(argv)
    if args.lr_patience is not None:
        LR_PATIENCE = args.lr_patience
    THREADS = args.threads or os.cpu_count()
    OUT = args.out
    if args.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    if args.render:
        print(write_markdown(_load_results()))
        return 0
    datasets = [d for d in args.datasets.split(",") if d]
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    results = run(datasets, models, seeds, force=args.force, max_epochs=args.max_epochs)
    if args.out == os.path.join(HERE, "accuracy.json"):
        print(write_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
