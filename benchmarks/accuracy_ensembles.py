"""Model-level fusion accuracy: members, averages, stacking, a greedy soup, distillation.

One recipe for every dataset (the constants below), three seeds, mean +- std of test
accuracy and the wall time of each step. Everything that is chosen or fitted after the
members (stacking, learned weights, the soup's greedy choice) uses a validation split of
the training data; the test split is only scored.

    python benchmarks/accuracy_ensembles.py            # runs, writes accuracy_ensembles.json
    python benchmarks/accuracy_ensembles.py --render   # prints the markdown section

Datasets: scikit-learn's digits (8x8 images); UCR sets through `kf.datasets.ucr` when that
loader exists and has the data locally (nothing downloads here).
"""

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kfusion as kf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "accuracy_ensembles.json")

SEEDS = (0, 1, 2)
MEMBERS = 3
MEMBER_EPOCHS = 30
MEMBER_LR = 3e-3
BATCH = 64
META_EPOCHS = 5  # stack and the learned average, Adam at its default step
OLD_META_EPOCHS = 20  # the former default: a random-start Dense on probabilities
FINETUNES = ((1e-3, 3), (5e-4, 3), (2e-3, 3))  # (learning rate, epochs) per soup ingredient
STUDENT_EPOCHS = 60
STUDENT_LR = 5e-3
UCR_SETS = ("GunPoint", "ItalyPowerDemand")

ROWS = (
    ("members", "members (mean of 3)"),
    ("average", "average"),
    ("average_geometric", 'average, mode="logits"'),
    ("average_learned", 'average, weights="learned"'),
    ("stack", 'stack (start="average")'),
    ("stack_geometric", 'stack (start="geometric")'),
    ("stack_random_start", "stack, random-start Dense (former default)"),
    ("finetunes", "soup ingredients (mean of 3)"),
    ("soup_greedy", 'soup, method="greedy"'),
    ("student_alone", "student alone"),
    ("student_distilled", "student distilled from the average"),
)


def _accuracy(model, x, y):
    pred = model.predict(x, verbose=0, batch_size=256)
    labels = (pred[:, 0] > 0.5) if pred.shape[-1] == 1 else np.argmax(pred, -1)  # binary heads
    return float(np.mean(labels.astype("int64") == np.asarray(y).reshape(-1)))


def _member(input_shape, num_classes, name):
    return kf.FusionModel(
        inputs=keras.Input(input_shape, name="x"),
        branches=[
            kf.branches.CNN(filters=(16, 32)),
            kf.branches.Transformer(dim=32, depth=1, num_heads=2, patch_size=2),
        ],
        fusion="concat",
        head=kf.heads.Classification(num_classes),
        name=name,
    )


def _student(input_shape, num_classes):
    return kf.FusionModel(
        inputs=keras.Input(input_shape, name="x"),
        branches=[kf.branches.CNN(filters=(16, 32))],
        head=kf.heads.Classification(num_classes),
        name="student",
    )


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_seed(data, seed):
    """One seed of every row: {row: (test accuracy, seconds)}."""
    (x_fit, y_fit), (x_val, y_val), (x_test, y_test) = data
    shape, classes = x_fit.shape[1:], int(max(y_fit.max(), y_test.max())) + 1
    scores, seconds = {}, {}

    def train_member(i):
        keras.utils.set_random_seed(1000 * seed + i)
        model = _member(shape, classes, f"member_{i}")
        model.compile(optimizer=keras.optimizers.Adam(MEMBER_LR))
        model.fit(x_fit, y_fit, epochs=MEMBER_EPOCHS, batch_size=BATCH, verbose=0)
        return model

    members, elapsed = [], []
    for i in range(MEMBERS):
        model, t = _timed(lambda i=i: train_member(i))
        members.append(model)
        elapsed.append(t)
    # Saved before stack() freezes them: the soup's fine-tunes start from member 0.
    start_config, start_weights = members[0].get_config(), members[0].get_weights()
    scores["members"] = [_accuracy(m, x_test, y_test) for m in members]
    seconds["members"] = float(np.mean(elapsed))

    scores["average"] = _accuracy(kf.ensemble.average(members), x_test, y_test)
    seconds["average"] = 0.0
    geometric = kf.ensemble.average(members, mode="logits")
    scores["average_geometric"] = _accuracy(geometric, x_test, y_test)
    seconds["average_geometric"] = 0.0

    binary = classes == 2  # a Classification(2) head returns one sigmoid unit
    loss = "binary_crossentropy" if binary else "sparse_categorical_crossentropy"

    def fit_on_val(model, epochs, optimizer="adam"):
        keras.utils.set_random_seed(seed)
        model.compile(optimizer=optimizer, loss=loss)
        model.fit(x_val, y_val, epochs=epochs, batch_size=32, verbose=0)
        return model

    for key, make, epochs in (
        ("average_learned", lambda: kf.ensemble.average(members, weights="learned"), META_EPOCHS),
        ("stack", lambda: kf.ensemble.stack(members), META_EPOCHS),
        ("stack_geometric", lambda: kf.ensemble.stack(members, start="geometric"), META_EPOCHS),
        (
            "stack_random_start",
            lambda: kf.ensemble.stack(
                members,
                meta=keras.layers.Dense(
                    1 if binary else classes,
                    activation="sigmoid" if binary else "softmax",
                    name="meta",
                ),
            ),
            OLD_META_EPOCHS,
        ),
    ):
        model, t = _timed(lambda make=make, epochs=epochs: fit_on_val(make(), epochs))
        scores[key] = _accuracy(model, x_test, y_test)
        seconds[key] = t

    def finetune(j, learning_rate, epochs):
        keras.utils.set_random_seed(1000 * seed + 100 + j)
        model = kf.FusionModel.from_config(start_config)
        model.set_weights(start_weights)
        model.trainable = True
        model.compile(optimizer=keras.optimizers.Adam(learning_rate))
        model.fit(x_fit, y_fit, epochs=epochs, batch_size=BATCH, verbose=0)
        return model

    ingredients, elapsed = [], []
    for j, (learning_rate, epochs) in enumerate(FINETUNES):
        model, t = _timed(lambda j=j, lr=learning_rate, e=epochs: finetune(j, lr, e))
        ingredients.append(model)
        elapsed.append(t)
    scores["finetunes"] = [_accuracy(m, x_test, y_test) for m in ingredients]
    seconds["finetunes"] = float(np.mean(elapsed))
    souped, t = _timed(lambda: kf.ensemble.soup(ingredients, x_val, y_val, method="greedy"))
    scores["soup_greedy"] = _accuracy(souped, x_test, y_test)
    seconds["soup_greedy"] = t

    teacher = kf.ensemble.average(members)

    def student(distilled):
        keras.utils.set_random_seed(1000 * seed + 500)
        model = _student(shape, classes)
        trained = kf.ensemble.Distiller(teacher, model) if distilled else model
        trained.compile(optimizer=keras.optimizers.Adam(STUDENT_LR))
        trained.fit(x_fit, y_fit, epochs=STUDENT_EPOCHS, batch_size=BATCH, verbose=0)
        return model

    for key, distilled in (("student_alone", False), ("student_distilled", True)):
        model, t = _timed(lambda d=distilled: student(d))
        scores[key] = _accuracy(model, x_test, y_test)
        seconds[key] = t
    params = {"member": members[0].count_params(), "student": model.count_params()}
    return scores, seconds, params


def digits_data():
    x, y = kf.datasets.digits(image=True)
    return (x[:1000], y[:1000]), (x[1000:1400], y[1000:1400]), (x[1400:], y[1400:])


def ucr_data(name):
    """(fit, val, test) of a UCR set, or None when `kf.datasets.ucr` or its data is absent."""
    loader = getattr(kf.datasets, "ucr", None)
    if loader is None:
        return None
    try:
        data = loader(name)
    except (ImportError, ValueError) as error:  # aeon or the set not there (no network)
        print(f"skipping UCR {name}: {type(error).__name__}: {error}")
        return None
    # The UCR training files are often sorted by class: a stratified, shuffled split.
    fit, val = kf.datasets.train_validation_split(
        data["x_train"], data["y_train"], validation_split=0.25, seed=0
    )
    return fit, val, (data["x_test"], data["y_test"])


def summarise(per_seed):
    rows = {}
    for key, _ in ROWS:
        values = [s[0][key] for s in per_seed]
        flat = np.ravel(values)
        rows[key] = {
            "accuracy": values,
            "mean": float(np.mean(flat)),
            "std": float(np.std([np.mean(v) for v in values])),
            "seconds": float(np.mean([s[1][key] for s in per_seed])),
        }
    return rows


def run(datasets=None):
    datasets = datasets or ["digits", *UCR_SETS]
    results = {
        "config": {
            "seeds": list(SEEDS),
            "members": MEMBERS,
            "member_epochs": MEMBER_EPOCHS,
            "member_learning_rate": MEMBER_LR,
            "meta_epochs": META_EPOCHS,
            "old_meta_epochs": OLD_META_EPOCHS,
            "finetunes": [list(f) for f in FINETUNES],
            "student_epochs": STUDENT_EPOCHS,
            "student_learning_rate": STUDENT_LR,
            "distiller": _distiller_defaults(),
            "backend": keras.config.backend(),
            "keras": keras.__version__,
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "datasets": {},
    }
    for name in datasets:
        data = digits_data() if name == "digits" else ucr_data(name)
        if data is None:
            continue
        start = time.perf_counter()
        per_seed = []
        for seed in SEEDS:
            scores, seconds, params = run_seed(data, seed)
            per_seed.append((scores, seconds))
            print(name, seed, {k: np.round(np.mean(v), 3) for k, v in scores.items()}, flush=True)
        results["datasets"][name] = {
            "sizes": {k: int(len(v[1])) for k, v in zip(("fit", "val", "test"), data)},
            "params": params,
            "rows": summarise(per_seed),
            "seconds": time.perf_counter() - start,
        }
        _write(results)  # after each dataset: a later failure keeps what is done
    return results


def _write(results):
    """Writes `results` to the json, keeping datasets of an earlier run not re-run now."""
    merged = results
    if os.path.exists(OUT):
        with open(OUT) as f:
            previous = json.load(f)
        merged = {**results, "datasets": {**previous.get("datasets", {}), **results["datasets"]}}
    with open(OUT, "w") as f:
        json.dump(merged, f, indent=1)
    return merged


def _distiller_defaults():
    import inspect

    signature = inspect.signature(kf.ensemble.Distiller.__init__)
    return {k: signature.parameters[k].default for k in ("temperature", "alpha")}


def render(results):
    """The markdown section of the model-level accuracy table."""
    names = sorted(results["datasets"], key=lambda n: (n != "digits", n))
    c = results["config"]
    lines = [
        "## Model-level fusion accuracy",
        "",
        f"Test accuracy, mean +- std over seeds {c['seeds']} (std of the per-seed means), "
        "and the mean wall time of the step that makes each row (training, or the fit on "
        "the validation split). Members: CNN + patch-Transformer FusionModels, "
        f"{c['member_epochs']} epochs at Adam {c['member_learning_rate']}; stack and the "
        f"learned average fit {c['meta_epochs']} epochs on the validation split with Adam's "
        f"default step (the random-start Dense gets {c['old_meta_epochs']}); the soup's "
        "ingredients fine-tune member 0 and the greedy choice is made on the validation "
        f"split; the student (a 2-layer CNN) trains {c['student_epochs']} epochs at Adam "
        f"{c['student_learning_rate']}, alone or through `Distiller` with its defaults "
        f"(temperature={c['distiller']['temperature']}, alpha={c['distiller']['alpha']}). "
        f"{c['backend']} backend, {c['cpus']} CPUs. Written by "
        "benchmarks/accuracy_ensembles.py.",
        "",
        "| model | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, label in ROWS:
        cells = []
        for name in names:
            row = results["datasets"][name]["rows"][key]
            cells.append(f"{row['mean']:.3f} +- {row['std']:.3f} ({row['seconds']:.1f} s)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    params = ", ".join(
        f"{name}: member {d['params']['member']:,}, student {d['params']['student']:,}"
        for name, d in results["datasets"].items()
    )
    lines += ["", f"Parameters ({params}).", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="print the markdown section")
    parser.add_argument("--datasets", nargs="*", help="digits and/or UCR names")
    args = parser.parse_args()
    if args.render:
        with open(OUT) as f:
            print(render(json.load(f)))
        return
    results = run(args.datasets)
    print(render(_write(results)))


if __name__ == "__main__":
    main()
