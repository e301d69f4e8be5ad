"""The README's layout section names every module of service/, so a reader finds each behaviour from it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"


def _layout() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Layout", 1)[1].split("\n## ", 1)[0]


def test_the_readme_layout_names_every_module_of_the_service() -> None:
    named = set(re.findall(r"[\w/]+\.py|[\w/]+/", _layout()))
    missing = [
        str(path.relative_to(SERVICE))
        for path in sorted(SERVICE.rglob("*.py"))
        if path.name != "__init__.py" and path.name not in named
    ]
    packages = [
        f"{path.relative_to(SERVICE)}/" for path in sorted(SERVICE.iterdir()) if (path / "__init__.py").is_file()
    ]
    assert missing == []
    assert [p for p in packages if p not in named] == []


def test_the_readme_layout_names_no_module_that_is_gone() -> None:
    service_block = _layout().split("service/", 1)[1].split("\nclients/", 1)[0]
    modules = {path.name for path in SERVICE.rglob("*.py")}
    assert [name for name in re.findall(r"\w+\.py", service_block) if name not in modules] == []
