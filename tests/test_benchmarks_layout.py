"""benchmarks/run.py: every table module registered, and --render reproducing RESULTS.md.

Nothing here times anything: the tables' modules are imported (they load no framework at
import) and RESULTS.md is rendered from the saved results.json in a temporary folder.
"""

import importlib
import json
import pkgutil
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def runner():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("run")
    finally:
        sys.path.remove(str(BENCH))


def test_every_table_module_is_registered_and_ordered(runner):
    modules = {m.name for m in pkgutil.iter_modules([str(BENCH / "run_tables")])}
    registered = {table.NAME for table in runner.TABLES}
    assert modules == registered | {"gpu"}, "a module of run_tables/ is not in run.TABLES"
    for table in runner.TABLES:
        assert table.__name__ == f"run_tables.{table.NAME}"
        assert callable(table.measure) and callable(table.markdown)

    order = [table.NAME for table in runner.run_order()]
    assert sorted(order) == sorted(registered)
    assert order[-1] == "ops", "the single-op table loads PyTorch: it must run last"
    for i, name in enumerate(order):
        for need in getattr(runner.BY_NAME[name], "NEEDS", ()):
            assert need in order[:i], f"{name} needs {need} timed before it"
    # --tables adds the tables a chosen one needs, and refuses names it does not know.
    assert [t.NAME for t in runner.run_order(["fusion_layers"])] == [
        "fusion_kinds",
        "fusion_layers",
    ]
    with pytest.raises(SystemExit, match="unknown table.*nope"):
        runner.run_order(["overhead", "nope"])

    saved = json.loads((BENCH / "results.json").read_text())
    assert set(saved["sections"]) == registered, "results.json lacks a table, or has a stale one"


def test_render_reproduces_results_md_and_keeps_other_sections(runner, tmp_path, capsys):
    for name in ("results.json", "NOTES.md", "RESULTS.md"):
        shutil.copy(BENCH / name, tmp_path / name)
    committed = (BENCH / "RESULTS.md").read_text()
    assert "<!-- section:serving -->" in committed  # written by serving.py, not by run.py

    runner.render(tmp_path)
    assert (tmp_path / "RESULTS.md").read_text() == committed

    # A GPU run's gpu.json becomes the GPU section; the other benchmarks' sections stay.
    gpu = json.loads((BENCH / "results.json").read_text())
    gpu = {k: gpu[k] for k in ("versions", "date", "rounds", "steps")} | {
        "peak_tflops": 100.0,
        "gpu": {
            "device": "gpu: test device",
            "batch 64": {"median_ms": 2.0, "samples_per_s": 32000.0, "tflops": 1.5},
        },
    }
    gpu["gpu"]["batch 64"]["fraction_of_peak"] = 0.015
    (tmp_path / "gpu.json").write_text(json.dumps(gpu))
    runner.render(tmp_path)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "(gpu: test device; keras" in text
    assert "| batch 64 | 2.0 | 32,000.0 | 1.50 | 0.015 |" in text
    assert "No accelerator was lent" not in text
    assert text.count("<!-- section:serving -->") == 1
    assert text.endswith(committed[committed.index("<!-- section:serving -->") :])
    capsys.readouterr()
