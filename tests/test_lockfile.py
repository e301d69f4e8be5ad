"""The lock files (requirements/*.txt, refreshed by scripts/lock) pin, with hashes, versions that setup.cfg allows.

scripts/test installs requirements/test.txt, scripts/run and the image requirements/runtime.txt, each with
`pip install --require-hashes`; these tests catch a lock that drifted from setup.cfg.
"""

from __future__ import annotations

import configparser
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Final

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

ROOT: Final = Path(__file__).resolve().parent.parent
RUNTIME_LOCK: Final = ROOT / "requirements" / "runtime.txt"
TEST_LOCK: Final = ROOT / "requirements" / "test.txt"

# The machines the locks are for: a fresh Debian with CPython 3.11 on x86_64 (the image's base too).
TARGET: Final = {
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


@dataclass(frozen=True)
class Pin:
    version: str
    hashes: frozenset[str]


def applies(marker: Marker | None, extra: str = "") -> bool:
    return marker is None or marker.evaluate({**TARGET, "extra": extra})


def read_lock(path: Path) -> dict[NormalizedName, Pin]:
    """The pins of a lock file that apply to the target machine; fails on a line that is not `name==version`."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pins: dict[NormalizedName, Pin] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = re.split(r"\s+--", line)
        requirement = Requirement(spec)
        [specifier] = requirement.specifier
        assert specifier.operator == "==", f"{path.name}: {spec!r} is not pinned"
        hashes = frozenset(o.removeprefix("hash=") for o in options if o.startswith("hash=sha256:"))
        assert hashes, f"{path.name}: {spec!r} has no sha256 hash"
        if applies(requirement.marker):
            name = canonicalize_name(requirement.name)
            assert name not in pins, f"{path.name}: {name} is pinned twice for the target"
            pins[name] = Pin(specifier.version, hashes)
    return pins


def setup_cfg_requirements(path: Path = ROOT / "setup.cfg") -> dict[str, list[Requirement]]:
    """install_requires under "" and each extra under its name."""
    parser = configparser.ConfigParser()
    parser.read(path)

    def parse(value: str) -> list[Requirement]:
        return [Requirement(line) for line in value.splitlines() if line.strip()]

    found = {"": parse(parser["options"]["install_requires"])}
    for extra, value in parser["options.extras_require"].items():
        found[extra] = parse(value)
    return found


def unmet(requirements: list[Requirement], pins: dict[NormalizedName, Pin]) -> list[str]:
    """What of `requirements` the pins do not satisfy on the target machine."""
    problems = []
    for requirement in requirements:
        if not applies(requirement.marker):
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement} is not locked")
        elif not requirement.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{requirement} is locked at {pin.version}")
    return problems


def dependencies(name: str, extras: set[str]) -> list[Requirement]:
    """What an installed distribution requires on the target machine, with the given extras."""
    required = [Requirement(r) for r in metadata.requires(name) or []]
    return [r for r in required if any(applies(r.marker, extra) for extra in {"", *extras})]


def test_every_pin_has_a_version_and_hashes() -> None:
    assert len(read_lock(RUNTIME_LOCK)) > 10
    assert len(read_lock(TEST_LOCK)) > len(read_lock(RUNTIME_LOCK))


def test_the_runtime_lock_satisfies_install_requires_and_the_outbox_extra() -> None:
    # The image runs the outbox relay too (EVA_WS_OUTBOX_DSN), which needs psycopg.
    wanted = setup_cfg_requirements()
    assert unmet(wanted[""] + wanted["outbox"], read_lock(RUNTIME_LOCK)) == []


def test_the_test_lock_satisfies_install_requires_and_the_test_extra() -> None:
    wanted = setup_cfg_requirements()
    assert unmet(wanted[""] + wanted["test"], read_lock(TEST_LOCK)) == []


def test_the_image_runs_the_versions_the_tests_ran_with() -> None:
    runtime, test = read_lock(RUNTIME_LOCK), read_lock(TEST_LOCK)
    assert {name: test.get(name) for name in runtime} == runtime


def test_the_tests_run_on_the_locked_versions() -> None:
    # scripts/test installs requirements/test.txt; a stale virtualenv would test other versions.
    locked = read_lock(TEST_LOCK)
    installed = {name: metadata.version(name) for name in locked}
    assert installed == {name: pin.version for name, pin in locked.items()}, "run scripts/test to reinstall"


@pytest.mark.parametrize(("lock", "extra"), [(RUNTIME_LOCK, "outbox"), (TEST_LOCK, "test")])
def test_each_lock_holds_everything_its_packages_require(lock: Path, extra: str) -> None:
    # Follows the requirements of every locked package (as installed at the locked version), with the
    # extras that setup.cfg asks for (redis[hiredis], PyJWT[crypto]), so pip never needs to look further.
    pins = read_lock(lock)
    wanted = setup_cfg_requirements()
    roots = wanted[""] + (wanted[extra] if extra else [])
    extras: dict[NormalizedName, set[str]] = {}
    for requirement in roots:
        extras.setdefault(canonicalize_name(requirement.name), set()).update(requirement.extras)
    problems = unmet(roots, pins)
    for name in pins:
        required = dependencies(name, extras.get(name, set()))
        problems += [f"{name} needs {p}" for p in unmet(required, pins)]
    assert problems == []


def test_a_lock_below_a_floor_of_setup_cfg_is_reported(tmp_path: Path) -> None:
    pins = read_lock(RUNTIME_LOCK)
    lock = tmp_path / "runtime.txt"
    lock.write_text(
        "".join(f"{name}=={pin.version} --hash={min(pin.hashes)}\n" for name, pin in pins.items() if name != "pyjwt")
        + "pyjwt==2.0.0 --hash=sha256:00\n"
    )
    floor = Requirement("PyJWT[crypto]>=2.14,<3")
    assert unmet([floor], read_lock(lock)) == [f"{floor} is locked at 2.0.0"]
    assert unmet([Requirement("orjson>=3.10")], {}) == ["orjson>=3.10 is not locked"]


def test_an_unpinned_or_unhashed_line_is_refused(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("orjson>=3.10 --hash=sha256:00\n")
    with pytest.raises(AssertionError, match="not pinned"):
        read_lock(lock)
    lock.write_text("orjson==3.10.0\n")
    with pytest.raises(AssertionError, match="no sha256 hash"):
        read_lock(lock)
