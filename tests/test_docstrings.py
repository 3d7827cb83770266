"""Every docstring example in kfusion runs (doctest), so the examples cannot rot."""

import doctest
import importlib
import pkgutil

import pytest

import kfusion


def _modules():
    names = []
    for info in pkgutil.walk_packages(kfusion.__path__, prefix="kfusion."):
        if info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("module_name", _modules())
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name):
        if test.examples and test.filename and test.filename.endswith(".py"):
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"


def test_every_public_class_and_function_has_an_example():
    missing = []
    for name in _modules():
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            if isinstance(obj, type(kfusion)):
                continue
            doc = getattr(obj, "__doc__", "") or ""
            if ">>>" not in doc:
                missing.append(f"{name}.{attr}")
    assert not missing, f"public names without a runnable example: {missing}"
