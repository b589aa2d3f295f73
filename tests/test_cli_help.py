"""--help of the session commands: the options most sessions set come first (issue 12)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from nvse_monitor.cli import main


@pytest.mark.parametrize("cmd", ["attach", "spawn", "launch"])
def test_main_options_before_file_caps_and_metrics(cmd):
    r = CliRunner().invoke(main, [cmd, "--help"])
    assert r.exit_code == 0
    options = r.output.split("Options:", 1)[1]
    listed = re.findall(r"^\s+(?:-\w, )?(--[a-z-]+)", options, re.M)
    first = [listed.index(o) for o in ("--profile", "--out", "--duration")]
    later = [listed.index(o) for o in ("--log-max-mb", "--csv-max-mb", "--keep-rotated",
                                       "--metrics-port", "--metrics-address")]
    assert first == sorted(first) and max(first) < min(later), listed
    assert first == [0, 1, 2], listed
