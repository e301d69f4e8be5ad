"""The tools users run (fleet/, bench/, scripts/) stand on their own: none of them imports the test suite."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleet import ROOT

TOOL_DIRS = ("fleet", "bench", "scripts")


def _python_files() -> list[Path]:
    return sorted(path for name in TOOL_DIRS for path in (ROOT / name).rglob("*.py"))


def _imported_modules(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module)
    return modules


def test_the_tools_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in _python_files()}
    assert {"fleet/cluster.py", "fleet/redis_server.py", "bench/targets.py"} <= names


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_tool_module_imports_the_test_suite(path: Path):
    offending = [m for m in _imported_modules(path) if m == "tests" or m.startswith("tests.")]
    assert offending == [], f"{path.relative_to(ROOT)} imports {offending}"


def test_no_script_runs_a_module_of_the_test_suite_as_a_program():
    # Running pytest on tests/ (scripts/test, scripts/fuzz) is what those scripts are for.
    scripts = [p for p in (ROOT / "scripts").rglob("*") if p.is_file() and p.suffix != ".py"]
    offending = [p.name for p in scripts if re.search(r"-m\s+tests\.", p.read_text(errors="replace"))]
    assert offending == []


def test_the_entry_points_load_neither_pytest_nor_the_test_suite():
    entry_points = ["fleet.cluster_cli", "fleet.bench_drain", "fleet.measure_redis_cluster", "bench.targets"]
    probe = (
        f"import importlib, json, sys\nfor name in {entry_points!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest', 'tests')"
        " or m == 'aiohttp.test_utils')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []
