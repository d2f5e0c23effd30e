"""Rich reprs: short text reprs (no console), HTML for notebooks with theme colours."""

from __future__ import annotations

import re

import pytest

import kvmlab
from conftest import CFG
from kvmlab import PoolStats

pytestmark = pytest.mark.kvm


def widths(html: str) -> dict[str, float]:
    """Tooltip -> width % of the bar segments in ``html``."""
    return {t: float(w) for t, w in re.findall(r'<div title="([^"]+)" style="width:([\d.]+)%', html)}


def assert_themed(html: str) -> None:
    assert "var(--jp-ui-font-color1" in html
    assert not re.search(r"color:\s*#(?:555|ccc|000|fff)\b", html), "fixed greys are unreadable on a dark theme"


@pytest.fixture(scope="module")
def long_run():
    with kvmlab.Vm.boot("counter", CFG, args={"steps": 40}) as vm:
        return vm.run_until_exit()


def test_run_result_text_repr_leaves_the_console_out(long_run):
    r = repr(long_run)
    lines = long_run.lines
    assert len(lines) > 20 and lines[0] not in r and lines[-1] not in r
    assert r.startswith("RunResult(reason='exit', exit_code=0, elapsed=")
    assert f"console=<{len(lines)} lines, {len(long_run.console)} chars>" in r
    assert len(r) < 120 and "\n" not in r


def test_run_result_html_folds_the_console_to_its_last_lines(long_run):
    html = long_run._repr_html_()
    lines = long_run.lines
    shown = re.search(r"<pre[^>]*>(.*)</pre>", html, re.S).group(1).split("\n")
    assert shown == [kvmlab._html.escape(x) for x in lines[-12:]]
    assert lines[0] not in html
    assert f"{len(lines)} lines, the last 12 shown ({len(lines) - 12} folded)" in html
    assert ">exit code<" in html
    assert_themed(html)


def test_checkpoint_result_shows_its_tag():
    with kvmlab.Vm.boot("counter", CFG, args={"steps": 4, "checkpoint_at": 2}) as vm:
        r = vm.run()
    assert "checkpoint_tag=0x2" in repr(r) and ">0x2<" in r._repr_html_()
    assert f"the last" not in r._repr_html_()  # short console: nothing folded


def test_snapshot_html(service_snap):
    html = service_snap._repr_html_()
    pages = service_snap.memory_bytes // 4096
    assert ">service<" in html and f"{service_snap.present_pages} of {pages}" in html
    assert "in memory" in html  # not file-backed
    w = widths(html)[f"{service_snap.present_pages} present pages"]
    assert w == pytest.approx(100 * service_snap.present_pages / pages, abs=0.01)
    assert_themed(html)


def test_pool_and_stats_reprs(service_snap):
    with kvmlab.RestorePool(service_snap.config, kvmlab.PoolConfig(min_size=0, max_size=4, max_in_use=3)) as pool:
        pool.warm(3)
        with pool.restore_snapshot(service_snap) as vm:
            vm.call(b"x")
            s = pool.stats()
            html = pool._repr_html_()
        text = repr(s)
        assert text == (
            f"PoolStats(idle={s.idle}/4, in_use=1/3, creating={s.creating}, restores=1 (hits {s.hits}, "
            f"misses {s.misses}), failures=0, created={s.created}, destroyed={s.destroyed})"
        )
        assert "RestorePool 16 MiB x 1 vCPU" in html
        occ = re.search(r'class="kvmlab-occupancy">([^<]*)<', html).group(1)
        assert occ.startswith(f"{s.idle} idle, 1 in use, {s.creating} creating; capacity 4 (min 0), in use limit 3")
        w = widths(html)
        assert w["in use"] == pytest.approx(100 * 1 / 4, abs=0.01)
        if s.idle:
            assert w["idle"] == pytest.approx(100 * s.idle / 4, abs=0.01)
        for c in ("restores", "hits", "misses", "failures"):
            assert f">{c}<" in html
        assert ">resets<" not in html  # optional-feature counters only once used
        assert_themed(html)
    assert "(closed)" in pool._repr_html_()


def test_pool_stats_html_without_a_pool():
    s = PoolStats(idle=2, in_use=3, max_size=4, min_size=1, max_in_use=None, creating=1, created=9, destroyed=4,
                  hits=5, misses=1, failures=0, restores=6, releases=3, pending_destroy=0, resets=2)  # fmt: skip
    html = s._repr_html_()
    # Over capacity (idle + in use + creating > max_size): the bar is out of the larger total.
    assert widths(html) == {"in use": 50.0, "idle": pytest.approx(33.33, abs=0.01), "creating": pytest.approx(16.67, abs=0.01)}
    assert ">resets<" in html and "in use limit none" in html


def test_reset_timing_html():
    with kvmlab.Vm.boot("counter", CFG, args={"steps": 4, "checkpoint_at": 2}) as vm:
        vm.run()
        snap = vm.snapshot()
    with snap, kvmlab.Vm.restore(snap, resettable=True) as rv:
        rv.run_until_exit()
        t = rv.reset()
    html = t._repr_html_()
    assert f"{t.dirty_pages} dirty pages put back" in html
    w = widths(html)
    assert sum(w.values()) == pytest.approx(100 * sum((t.log_ns, t.memory_ns, t.vcpu_ns, t.devices_ns)) / max(
        t.total_ns, t.log_ns + t.memory_ns + t.vcpu_ns + t.devices_ns), abs=0.05)
    assert {k.split(":")[0] for k in w} <= {"log", "memory", "vcpu", "devices"}
    assert_themed(html)
