"""The wheel holds every package and data file of the source tree (setup.py's discovery).

A regular install is what users run; `make setup` only ever exercises the editable one, whose
finder serves any folder on disk. scripts/check_wheel.py (run by .ci/run) goes further: the
wheel in a clean venv, `kvctl serve` and `kvctl worker` started from it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.check_wheel import (
    build_wheel,
    copy_source,
    expected_contents,
    wheel_contents,
    wheel_modules,
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_every_package_folder_and_data_file_is_in_the_wheel(wheel: Path) -> None:
    want_pkgs, want_files = expected_contents()
    got_pkgs, got_files = wheel_contents(wheel)
    # the folders that broke `pip install kvctl` before discovery, and the data-only ones
    assert {"kvctl.server.controller", "kvctl.server.worker", "kvctl.server.http.routers",
            "kvctl.common.texts.suite", "kvctl.common.profiles"} <= want_pkgs
    assert sorted(want_pkgs - got_pkgs) == []
    assert sorted(want_files - got_files) == []
    # and nothing from outside the three folders (tests, benchmarks, scripts)
    assert {p.split(".")[0] for p in got_pkgs} == {"kvctl"}


def test_a_new_folder_is_packaged_without_being_listed(tmp_path: Path) -> None:
    """Discovery, not a list: a new code folder and a new data-only folder ship as they are."""
    src = copy_source(tmp_path / "src")
    (src / "server" / "newpart").mkdir()
    (src / "server" / "newpart" / "__init__.py").write_text("")
    (src / "server" / "newpart" / "thing.py").write_text("VALUE = 1\n")
    (src / "kvctl" / "common" / "newdata").mkdir()
    (src / "kvctl" / "common" / "newdata" / "table.json").write_text("{}\n")
    got_pkgs, got_files = wheel_contents(build_wheel(tmp_path, src))
    assert "kvctl.server.newpart" in got_pkgs
    assert "kvctl/server/newpart/thing.py" in got_files
    assert "kvctl/common/newdata/table.json" in got_files
    want_pkgs, want_files = expected_contents(src)
    assert want_pkgs <= got_pkgs and want_files <= got_files


def test_the_comparison_sees_a_missing_folder(wheel: Path, tmp_path: Path) -> None:
    """The check itself can fail: a tree with a folder the wheel lacks is reported."""
    src = copy_source(tmp_path / "src")
    (src / "server" / "unshipped").mkdir()
    (src / "server" / "unshipped" / "x.py").write_text("")
    want_pkgs, _ = expected_contents(src)
    got_pkgs, _ = wheel_contents(wheel)
    assert want_pkgs - got_pkgs == {"kvctl.server.unshipped"}


def test_wheel_modules_names_every_module(wheel: Path) -> None:
    mods = wheel_modules(wheel)
    assert {"kvctl", "kvctl.cli", "kvctl.server.runner", "kvctl.server.controller",
            "kvctl.server.worker.metrics", "kvctl.codecs"} <= set(mods)
    assert not [m for m in mods if m.endswith("__init__")]
