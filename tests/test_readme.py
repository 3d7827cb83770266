"""Every Python code block in README.md runs, so the README cannot rot."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})


def test_api_table_matches_all():
    import importlib

    text = open(README, encoding="utf-8").read()
    section = text.split("## API", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(kfusion[\w.]*)` \| (.*) \|$", section, re.M)
    assert rows, "README has no API table"
    listed = {module: set(re.findall(r"`(\w+)`", names)) for module, names in rows}
    expected_modules = {"kfusion"} | {
        f"kfusion.{n}"
        for n in importlib.import_module("kfusion").__all__
        if not n.startswith("_") and n[0].islower()
    }
    assert set(listed) == expected_modules
    for module, names in listed.items():
        public = set(importlib.import_module(module).__all__) - {"__version__"}
        assert names == public, (
            f"{module}: README lists {sorted(names)}, __all__ has {sorted(public)}"
        )
