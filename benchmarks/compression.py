"""Compression table: file size and test accuracy of each export of one trained model.

    python benchmarks/compression.py [--threads 1] [--epochs 40]

The three-branch network (CNN | LSTM | Transformer, gated fusion) is trained on scikit-
learn's digits (rows of each 8x8 image as 8 time steps of 8 features; 1,437 train / 360
test rows) and on ItalyPowerDemand from the UCR archive (24 steps, 1 channel; official split,
67 / 1,029), with the small-data recipe (stratified validation fifth, early stopping on the
best validation epoch). Each model is then exported as float32 `.keras`, int8 `.keras`
(keras' `quantize("int8")`), LiteRT float32 / dynamic / float16 / int8 (int8 calibrated on
the training inputs), ONNX float32 and ONNX dynamic int8, and every file is scored on the
test split with its own runtime (keras, the LiteRT interpreter, onnxruntime). Writes
`benchmarks/compression.json` and the `compression` section of `benchmarks/RESULTS.md`.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

VARIANTS = [
    ("float32 .keras", "keras", None),
    ("int8 .keras", "keras", "int8"),
    ("LiteRT float32", "litert", None),
    ("LiteRT dynamic", "litert", "dynamic"),
    ("LiteRT float16", "litert", "float16"),
    ("LiteRT int8", "litert", "int8"),
    ("ONNX float32", "onnx", None),
    ("ONNX dynamic int8", "onnx", "dynamic"),
]
SUFFIX = {"keras": ".keras", "litert": ".tflite", "onnx": ".onnx"}


def set_threads(threads):
    for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ[var] = str(threads)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def datasets():
    import kfusion as kf

    x, y = kf.datasets.digits(image=False, seed=0)
    split = int(0.8 * len(y))
    yield "digits", (x[:split], y[:split], x[split:], y[split:])
    ucr = kf.datasets.ucr("ItalyPowerDemand")
    yield "ItalyPowerDemand", (ucr["x_train"], ucr["y_train"], ucr["x_test"], ucr["y_test"])


def make_model(steps, features, classes):
    import keras

    import kfusion as kf

    return kf.FusionModel(
        inputs=keras.Input((steps, features), name="signal"),
        branches=[
            kf.branches.CNN(filters=(64, 64), kernel_size=3),
            kf.branches.RNN(units=64),
            kf.branches.Transformer(dim=64, depth=2, num_heads=4, intermediate_dim=128),
        ],
        fusion="gated",
        normalize="series" if features == 1 else None,
        head=kf.heads.Classification(classes),
    )


def predict(fmt, path, x, threads):
    import numpy as np

    if fmt == "keras":
        from kfusion.export import load

        return load(path).predict(x, batch_size=64, verbose=0)
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=path, num_threads=threads).get_signature_runner()
    rows = []
    for r in range(len(x)):
        (out,) = runner(signal=x[r : r + 1]).values()
        rows.append(out)
    return np.concatenate(rows)


def run(args):
    import keras
    import numpy as np

    import kfusion as kf
    from kfusion.export import export

    results = {}
    folder = tempfile.mkdtemp(prefix="kfusion-compression-")
    for name, (x_tr, y_tr, x_te, y_te) in datasets():
        keras.utils.set_random_seed(0)
        classes = int(max(y_tr.max(), y_te.max())) + 1
        model = make_model(x_tr.shape[1], x_tr.shape[2], classes)
        start = time.time()
        kf.recipes.small_data(model, x_tr, y_tr, max_epochs=args.epochs, patience=15)
        train_s = time.time() - start
        # The exports hold the weights only: an uncompiled copy (no optimizer state, which
        # would triple the .keras file).
        trained = model
        model = make_model(x_tr.shape[1], x_tr.shape[2], classes)
        model.set_weights(trained.get_weights())
        rows = []
        for label, fmt, mode in VARIANTS:
            path = os.path.join(folder, f"{name}-{label.replace(' ', '_')}{SUFFIX[fmt]}")
            result = export(model, path, format=fmt, quantize=mode, data=x_tr)
            pred = predict(fmt, path, x_te, args.threads)
            # A binary head is one sigmoid unit: class 1 above 0.5.
            classes_pred = pred[:, 0] > 0.5 if pred.shape[-1] == 1 else np.argmax(pred, -1)
            rows.append(
                {
                    "export": label,
                    "size_kib": result.size_bytes / 1024,
                    "accuracy": float(np.mean(classes_pred == y_te)),
                }
            )
            print(name, label, rows[-1], flush=True)
        base = rows[0]
        for row in rows:
            row["size_ratio"] = row["size_kib"] / base["size_kib"]
            row["accuracy_points"] = 100 * (row["accuracy"] - base["accuracy"])
        results[name] = {
            "train_rows": int(len(y_tr)),
            "test_rows": int(len(y_te)),
            "train_seconds": train_s,
            "parameters": int(model.count_params()),
            "rows": rows,
        }
    return results


def markdown(data):
    lines = [
        "## Compression: size and test accuracy of each export",
        "",
        f"Written by `python benchmarks/compression.py --threads {data['threads']}` on "
        f"{data['date']} ({data['machine']}). The three-branch network (CNN 64-64 | "
        "LSTM 64 | Transformer 64x2, gated fusion), trained once per data set with the "
        "small-data recipe, then exported each way; every file is scored on the test "
        "split by its own runtime (keras, the LiteRT interpreter, onnxruntime). Size "
        "ratio and accuracy change are against the float32 `.keras` file (weights only, no "
        "optimizer state).",
        "",
    ]
    for name, res in data["results"].items():
        lines += [
            f"**{name}** ({res['train_rows']} train / {res['test_rows']} test rows, "
            f"{res['parameters']:,} parameters)",
            "",
            "| export | size (KiB) | x float32 | test accuracy | change (points) |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in res["rows"]:
            lines.append(
                f"| {row['export']} | {row['size_kib']:.1f} | {row['size_ratio']:.2f} | "
                f"{row['accuracy']:.3f} | {row['accuracy_points']:+.1f} |"
            )
        lines.append("")
    lines += [
        "Target: int8 paths lose <= 1 accuracy point and are <= 0.3x the float32 size.",
        "",
    ]
    lines += data.get("notes", [])
    return "\n".join(lines)


def target_notes(results):
    notes = []
    for name, res in results.items():
        for row in res["rows"]:
            if "int8" not in row["export"]:
                continue
            ok_size = row["size_ratio"] <= 0.3
            ok_acc = row["accuracy_points"] >= -1.0
            verdict = "met" if ok_size and ok_acc else "missed"
            notes.append(
                f"- {name}, {row['export']}: {verdict} (size {row['size_ratio']:.2f}x, "
                f"accuracy {row['accuracy_points']:+.1f} points)."
            )
    return notes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--render", action="store_true", help="only rewrite the section")
    args = parser.parse_args()
    out = os.path.join(HERE, "compression.json")
    if not args.render:
        set_threads(args.threads)
        results = run(args)
        data = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)",
            "threads": args.threads,
            "results": results,
        }
        data["notes"] = target_notes(results)
        with open(out, "w") as f:
            json.dump(data, f, indent=1)
    data = json.load(open(out))
    data["notes"] = target_notes(data["results"])
    notes_path = os.path.join(HERE, "COMPRESSION_NOTES.md")
    if os.path.exists(notes_path):
        data["notes"] += [""] + open(notes_path).read().strip().splitlines()
    from _marked import write_section

    write_section(os.path.join(HERE, "RESULTS.md"), "compression", markdown(data))


if __name__ == "__main__":
    main()
