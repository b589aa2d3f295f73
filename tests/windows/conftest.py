"""The Windows lane's fixtures (tests/windows/run.sh sets it up; without it every test here
skips, so the Linux suite can collect this directory)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from windows.fakes import PeInstall, build_pe_install, mingw_problem
from windows.winlane import win_python


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    why = None
    if not win_python() or shutil.which("wine") is None:
        why = "Windows lane not set up (run: bash tests/windows/run.sh)"
    elif problem := mingw_problem():
        why = problem
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.windows)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def pe(tmp_path_factory: pytest.TempPathFactory) -> PeInstall:
    return build_pe_install(tmp_path_factory.mktemp("fnv-pe") / "Fallout New Vegas")


@pytest.fixture(scope="module")
def exe() -> str:
    """The single-file nvse-monitor.exe that run.sh built (tests/windows/build_exe.sh)."""
    path = os.environ.get("NVSE_WIN_EXE")
    if not path:
        pytest.skip("nvse-monitor.exe not built (bash tests/windows/build_exe.sh; run.sh does)")
    if not Path(path).is_file():
        pytest.fail(f"the build of nvse-monitor.exe failed ({path} is missing)")
    return path
