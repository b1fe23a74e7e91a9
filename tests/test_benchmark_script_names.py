"""No benchmark script may be named like a package: `python benchmarks/x.py` puts benchmarks/ first on sys.path, so
a benchmarks/kernels.py was imported by transformers when it probed for the Hugging Face `kernels` package (hence
benchmarks/kernel_bench.py)."""

import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _packages_transformers_probes() -> set[str]:
    import transformers.utils.import_utils as import_utils

    names = set(re.findall(r'_is_package_available\(\s*"([A-Za-z0-9_]+)"', inspect.getsource(import_utils)))
    if len(names) < 10:
        pytest.fail("transformers.utils.import_utils no longer probes packages through _is_package_available(\"...\"); "
                    "update this test's way of listing the names it probes")
    return names | {"kernels"}


def test_no_benchmark_script_shadows_a_package():
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert "kernel_bench" in scripts and "mixtral_e2e" in scripts
    probed = _packages_transformers_probes()
    stdlib = set(sys.stdlib_module_names)
    for name in scripts:
        assert name not in probed, f"benchmarks/{name}.py shadows the package {name!r} that transformers imports"
        assert name not in stdlib, f"benchmarks/{name}.py shadows the standard library module {name!r}"
        assert importlib.util.find_spec(name) is None, f"benchmarks/{name}.py shadows the installed module {name!r}"
