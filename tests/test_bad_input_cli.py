"""Bad input through the command line (issue 5): fuzzed recordings given to `replay` and `info`,
broken `--profile` files, and targets that cannot be attached. Each ends in one clear line and
a non-zero exit, never a traceback. (The reader itself is fuzzed in test_fuzz_recording.py, the
profile parser field by field in test_profiles.py; here it is the path a user takes.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest
from click.testing import CliRunner
from conftest import REPO, tmpfs
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_fuzz_recording import base, body_case, frame_case, raw_case

from nvse_monitor.cli import main
from nvse_monitor.outputs.files import FilePaths

N_CLI_CASES = int(os.environ.get("NVSE_FUZZ_CLI_CASES", "300"))


def check_cli_result(r, path, allowed=(0, 2)) -> str:
    """One invocation: exit 0 or 2; on 2 exactly one stderr line naming the file; no traceback."""
    assert r.exit_code in allowed, (r.exit_code, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    if r.exit_code == 2:
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1, r.stderr
        assert str(path) in lines[0], lines[0]
        return "error"
    return "clean"


def test_fuzzed_recordings_through_the_cli(tmp_path, record_property):
    base()
    path = tmp_path / "fuzz.nvmrec"
    out = tmp_path / "out"
    runner = CliRunner()
    outcomes: Counter[str] = Counter()

    @settings(max_examples=N_CLI_CASES, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(raw_case(), frame_case(), body_case()))
    def run(case):
        level, data = case
        path.write_bytes(data)
        shutil.rmtree(out, ignore_errors=True)
        r = runner.invoke(main, ["replay", str(path), "-o", str(out)])
        replayed = check_cli_result(r, path)
        if replayed == "clean" or out.exists():
            # whatever was intact got final files: SHUTDOWN in the status file
            status = FilePaths.of(out).status.read_text()
            assert "Status: SHUTDOWN" in status
        r = runner.invoke(main, ["info", str(path)])
        informed = check_cli_result(r, path)
        assert informed == replayed  # both commands agree on whether the file is damaged
        outcomes[f"{level}:{replayed}"] += 1
        outcomes["cases"] += 1

    run()
    print(f"\nCLI fuzz: {dict(outcomes)}")
    record_property("cli_fuzz_cases", outcomes["cases"])
    assert outcomes["cases"] == N_CLI_CASES
    assert sum(v for k, v in outcomes.items() if k.endswith(":error")) > N_CLI_CASES // 2


# ---- profiles: `--profile path.toml` ------------------------------------------------------------

GOOD = """[profile]
name = "mine"
platform = "linux"
arch = ["x64"]

[[hook]]
name = "my_malloc"
heap = "libc"
role = "alloc"
module = "libc.so.6"
export = "malloc"
args = { size = 0 }
"""

BAD_PROFILES = [
    # (id, change, what the line must name)
    ("bad-toml", ("[[hook]]", "[[hook]"), ["invalid TOML"]),
    ("unknown-role", ('role = "alloc"', 'role = "allocate"'),
     ["hook 'my_malloc'", "field 'role'", "allocate"]),
    ("unknown-abi", ('args = {', 'abi = "pascal"\nargs = {'),
     ["hook 'my_malloc'", "field 'abi'", "pascal"]),
    ("missing-heap", ('heap = "libc"\n', ""), ["hook 'my_malloc'", "field 'heap'", "missing"]),
    ("unparsable-offset", ('export = "malloc"', 'offset = "0x12zz"'),
     ["hook 'my_malloc'", "field 'offset'", "0x12zz"]),
    ("address-out-of-range", ('module = "libc.so.6"\nexport = "malloc"', "address = -5"),
     ["hook 'my_malloc'", "field 'address'"]),
    ("unknown-arch", ('arch = ["x64"]', 'arch = ["mips"]'), ["field 'profile.arch'", "mips"]),
    ("not-utf8", None, ["mine.toml"]),
]


@pytest.mark.parametrize(("change", "expect"), [p[1:] for p in BAD_PROFILES],
                         ids=[p[0] for p in BAD_PROFILES])
@pytest.mark.parametrize("cmd", ["attach", "spawn"])
def test_bad_profile_through_the_cli(tmp_path, cmd, change, expect):
    """The profile is read before any process is touched: PID 1 is never attached to, and
    spawn never starts the program."""
    prof = tmp_path / "mine.toml"
    if change is None:
        prof.write_bytes(GOOD.encode() + b"\n# \xff\xfe\n")
    else:
        assert change[0] in GOOD
        prof.write_text(GOOD.replace(change[0], change[1], 1))
    marker = tmp_path / "spawned"
    target = ["1"] if cmd == "attach" else ["--", "/bin/touch", str(marker)]
    r = CliRunner().invoke(main, [cmd, "--profile", str(prof), "--out", str(tmp_path / "o"),
                                  *target])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit | None)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert lines[0].startswith("nvse-monitor: error: ") and str(prof) in lines[0]
    for text in expect:
        assert text in lines[0], lines[0]
    assert not marker.exists()


def test_profile_that_is_code_is_just_bad_toml(tmp_path):
    """Profiles are data: a Python or JS file given as a profile is rejected as TOML."""
    prof = tmp_path / "evil.toml"
    marker = tmp_path / "ran"
    prof.write_text(f"import os\nos.system('touch {marker}')\n")
    r = CliRunner().invoke(main, ["attach", "1", "--profile", str(prof), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "invalid TOML" in r.stderr and not marker.exists()


# ---- targets that cannot be attached ------------------------------------------------------------


def run_cli(*args: object, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), sys.executable, "-m", "nvse_monitor",
                           *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=60)


def one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture
def other_users_process():
    """A process of user 65534 (nobody), for a monitor that lacks CAP_SYS_PTRACE."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to make a process of another user")
    p = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          "sleep", "60"])
    deadline = time.monotonic() + 10
    while os.stat(f"/proc/{p.pid}").st_uid != 65534 and time.monotonic() < deadline:
        time.sleep(0.02)
    yield p
    p.kill()
    p.wait()


def test_permission_denied_is_a_clear_error(other_users_process, tmp_path):
    """A monitor without CAP_SYS_PTRACE (an ordinary user) and another user's process."""
    drop = ["setpriv", "--bounding-set=-sys_ptrace", "--"]
    pid = other_users_process.pid
    line = one_line(run_cli("attach", pid, "--out", tmp_path, prefix=drop))
    assert f"PID {pid}" in line and "permission denied" in line
    # the monitor runs as root here, with CAP_SYS_PTRACE dropped: "run as root" would be wrong
    assert "without CAP_SYS_PTRACE" in line and "run as" not in line
    assert other_users_process.poll() is None  # unharmed


def test_unwritable_out_dir_refused_before_attaching(tmp_path):
    (tmp_path / "file").write_text("")
    line = one_line(run_cli("attach", "1", "--out", tmp_path / "file" / "out"))
    assert line == (f"nvse-monitor: error: cannot write to output directory "
                    f"{tmp_path}/file/out: Not a directory")
    marker = tmp_path / "spawned"
    line = one_line(run_cli("spawn", "--out", tmp_path / "file" / "x", "--", "/bin/touch", marker))
    assert "cannot write to output directory" in line and "Not a directory" in line
    assert not marker.exists()  # the program was never started


def test_read_only_out_dir_refused(tmp_path):
    """A read-only file system (root ignores file modes, so a read-only tmpfs is the real test)."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        line = one_line(run_cli("attach", "1", "--out", ro))
        assert line == f"nvse-monitor: error: cannot write to output directory {ro}: " \
            "Read-only file system"
        r = CliRunner().invoke(main, ["replay", str(REPO / "fixtures" / "synthetic-small.nvmrec"),
                                      "-o", str(ro / "sub")])
        assert r.exit_code == 2 and "Read-only file system" in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1
