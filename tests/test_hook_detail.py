"""The log's words for a hook that took the slow path (issue 12): what happened and that it is
harmless, not Frida's "please file a bug"."""

from __future__ import annotations

from nvse_monitor.engine.engine import plain_hook_detail

AGENT = ("0x7f50943bb610 libc.so.6!aligned_alloc (slow path: Interceptor.replace, replaceFast "
         "said: unable to intercept function at 0x7f50943bb610; please file a bug)")


def test_slow_path_in_plain_words():
    text = plain_hook_detail(AGENT)
    assert text.startswith("0x7f50943bb610 libc.so.6!aligned_alloc; the function is too short")
    assert "harmless, every call is recorded" in text and "Interceptor.replace" in text
    assert "file a bug" not in text and "replaceFast said" not in text


def test_other_refusals_keep_fridas_reason():
    text = plain_hook_detail("x (slow path: Interceptor.replace, replaceFast said: boom)")
    assert "Frida's fast hook refused it: boom" in text and "harmless" in text


def test_other_details_unchanged():
    for d in ("0x1 libc.so.6!malloc", "follows JMP into nvhr.dll (0x1000)", ""):
        assert plain_hook_detail(d) == d


def test_golden_log_says_it_plainly():
    from conftest import REPO

    log = (REPO / "fixtures/expected/live-x64/MemoryPoolNVSE_rpmalloc.log").read_text()
    line = next(x for x in log.splitlines() if "aligned_alloc" in x and "Hook installed" in x)
    assert "harmless" in line and "please file a bug" not in line
