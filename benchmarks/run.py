"""kfusion benchmarks: one command, rewrites benchmarks/RESULTS.md.

    python benchmarks/run.py            # all tables (20-30 minutes on 2 cores)
    python benchmarks/run.py --quick    # fewer rounds, for a smoke run
    python benchmarks/run.py --render   # RESULTS.md again from results.json and NOTES.md
    python benchmarks/run.py --tables overhead,fusion_layers   # these tables only, printed

Method: every comparison interleaves its contenders (A, B, A, B, ...) over several rounds,
each round timing a fixed number of training steps after a warm-up, so drift on a shared
machine hits all contenders alike. Reported: the median step time per contender and the
ratio of medians. Timings live here, never in the test suite.

Each table is one module of `run_tables/` (its timing and its part of RESULTS.md); the
network and the random data are in `_models.py`, the timing and interleaving helpers in
`_timing.py`. This file runs the tables, saves results.json and writes RESULTS.md.
"""

import argparse
import datetime
import json
import os
import platform
import sys

from _marked import read_sections, write_section
from _models import BATCH, CLASSES, F, T
from _timing import run_worker, serve_torch
from run_tables import (
    backends,
    fusion_kinds,
    fusion_layers,
    gpu,
    inference,
    ops,
    overhead,
    pipeline,
    threads,
    vs_pytorch,
    vs_pytorch_branches,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# The tables of a full run, in the order RESULTS.md shows them. `run_order` times the ones
# marked LAST (the single-op table, which loads PyTorch into this process) after the others.
TABLES = (
    overhead,
    vs_pytorch,
    vs_pytorch_branches,
    ops,
    fusion_kinds,
    fusion_layers,
    pipeline,
    backends,
    threads,
    inference,
)
BY_NAME = {table.NAME: table for table in TABLES}


def run_order(names=None):
    """The table modules to time for `names` (all when None), with the tables they need."""
    wanted = set(BY_NAME if names is None else names)
    unknown = wanted - set(BY_NAME)
    if unknown:
        known = ", ".join(BY_NAME)
        raise SystemExit(f"unknown table(s): {', '.join(sorted(unknown))}; known: {known}")
    for name in list(wanted):
        wanted |= set(getattr(BY_NAME[name], "NEEDS", ()))
    chosen = [table for table in TABLES if table.NAME in wanted]
    return sorted(chosen, key=lambda table: getattr(table, "LAST", False))


def measure(tables, rounds, steps):
    """{name: result} of each table module in `tables`, timed in that order."""
    done = {}
    for table in tables:
        done[table.NAME] = table.measure(rounds, steps, done)
    return done


def versions():
    import keras
    import numpy as np

    out = {"python": platform.python_version(), "keras": keras.__version__, "numpy": np.__version__}
    for mod in ("tensorflow", "jax", "torch"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "not installed"
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--render", action="store_true", help="rewrite RESULTS.md from results.json and NOTES.md"
    )
    parser.add_argument(
        "--tables",
        default=None,
        help=f"comma-separated tables to time ({', '.join(BY_NAME)}), with the ones they need; "
        "prints their results and Markdown and writes no file",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-torch", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jit", choices=("auto", "true", "false"), default="auto")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="time the model under mixed_bfloat16 on the backend's device; writes gpu.json",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    steps = args.steps or (5 if args.quick else 20)
    if args.serve_torch:
        serve_torch(args.serve_torch, args.compile)
        return
    if args.worker:
        run_worker(rounds, steps, args.jit)
        return
    if args.gpu:
        saved = run_header(rounds, steps) | {"peak_tflops": args.peak_tflops}
        saved["gpu"] = gpu.measure(rounds, steps, args.peak_tflops)
        with open(os.path.join(HERE, "gpu.json"), "w") as f:
            json.dump(saved, f, indent=2)
        print(json.dumps(saved, indent=2))
        if os.path.exists(os.path.join(HERE, "results.json")):
            render()
        return
    if args.render:
        render()
        return
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if args.tables:
        tables = run_order(name.strip() for name in args.tables.split(",") if name.strip())
        sections = measure(tables, rounds, steps)
        print(json.dumps(dict(run_header(rounds, steps), sections=sections), indent=2))
        print("\n\n".join(BY_NAME[name].markdown(result) for name, result in sections.items()))
        return
    sections = measure(run_order(), rounds, steps)
    saved = run_header(rounds, steps)
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(dict(saved, sections=sections), f, indent=2)
    write_markdown(sections, rounds, steps, saved["date"], saved["versions"], host=saved["machine"])


def run_header(rounds, steps):
    """What every saved run records beside its results: versions, date and run lengths."""
    today = datetime.date.today().isoformat()
    header = {"versions": versions(), "date": today, "rounds": rounds, "steps": steps}
    return header | {"machine": machine()}


def machine():
    """The machine a run times on, as RESULTS.md describes it (saved with the results)."""
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_name(),
        "system": platform.system(),
        "release": platform.release(),
    }


def render(folder=HERE):
    """RESULTS.md again from results.json (and gpu.json, NOTES.md where they exist)."""
    with open(os.path.join(folder, "results.json")) as f:
        saved = json.load(f)
    write_markdown(
        saved["sections"],
        saved["rounds"],
        saved["steps"],
        saved["date"],
        saved["versions"],
        folder=folder,
        host=saved.get("machine"),
    )


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        flags = open("/proc/cpuinfo").read()
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        return f"{names[0]}, {isa}" if names else platform.machine()
    except OSError:
        return platform.machine()


def markdown(sections, rounds, steps, date, v, folder=HERE, host=None):
    """RESULTS.md's text: the run's header, each table's part, the GPU section, NOTES.md.

    `host` is the saved `machine()` of the run; results saved before it was recorded are
    described with this machine's.
    """
    host = host or machine()
    notes_path = os.path.join(folder, "NOTES.md")
    notes = open(notes_path).read() if os.path.exists(notes_path) else ""
    header = f"""# kfusion benchmarks

Written by `python benchmarks/run.py` on {date}.

- Machine: {host["cores"]} CPU cores ({host["cpu"]}), {host["system"]}
  {host["release"]}; no GPU lent to the session that ran this (see "GPU" below).
- Versions: {", ".join(f"{k} {val}" for k, val in v.items())}.
- Network: three branches on one (batch {BATCH}, T={T}, F={F}) input: Conv1D x2 (64) | LSTM 64 |
  two Transformer blocks (d=64, 4 heads) -> fusion -> Dense({CLASSES}).
- Method: contenders interleaved (A, B, ..., then reversed) over {rounds} rounds of {steps}
  training steps each after a warm-up; median seconds per step; ratio = median / baseline's
  median. train_on_batch on in-memory NumPy batches. Garbage collection runs before each
  timed round and not during it (as `timeit` does). PyTorch trains in a child process that
  times a round when asked, so the runs interleave while the two frameworks' thread pools
  never share a process (the single-op table is the exception: one process, ops in turn)."""
    parts = [header] + [table.markdown(sections[table.NAME]) for table in TABLES]
    return "\n\n".join(parts + [gpu.markdown(folder), notes]) + "\n"


def write_markdown(sections, rounds, steps, date, v, folder=HERE, host=None):
    """Rewrite RESULTS.md, keeping the marked sections other benchmarks wrote (`_marked`)."""
    path = os.path.join(folder, "RESULTS.md")
    kept = read_sections(path)
    md = markdown(sections, rounds, steps, date, v, folder=folder, host=host)
    with open(path, "w") as f:
        f.write(md)
    for name, text in kept:
        write_section(path, name, text)
    print(md)


if __name__ == "__main__":
    main()
