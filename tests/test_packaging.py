"""pyproject.toml: an SPDX license string (PEP 639) with a setuptools that reads it, so pip
prints no `project.license` deprecation warning (issue 12)."""

from __future__ import annotations

import re
import tomllib

from conftest import REPO


def test_license_is_an_spdx_string_and_setuptools_can_read_it():
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert doc["project"]["license"] == "MIT"
    req = next(r for r in doc["build-system"]["requires"] if r.startswith("setuptools"))
    m = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", req)
    assert m and int(m.group(1)) >= 77, req  # setuptools 77: license expressions
    assert "license-files" not in doc["project"] or doc["project"]["license-files"]


def test_every_subpackage_is_in_the_wheel():
    """A subpackage missing from [tool.setuptools] packages is left out of a non-editable install
    (`pip install .`, the Windows lane's Python, nvse-monitor.exe): found by the Windows lane when
    nvse_monitor.capture came without its entry."""
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(doc["tool"]["setuptools"]["packages"])
    pkgs = {".".join(p.parent.relative_to(REPO).parts)
            for p in (REPO / "nvse_monitor").rglob("__init__.py")}
    assert pkgs <= listed, sorted(pkgs - listed)
