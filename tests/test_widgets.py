"""kvmlab.widgets without a browser: clicks, observers and state on a real pool."""

from __future__ import annotations

import threading
import time

import pytest

import kvmlab
from kvmlab import PoolStats
from kvmlab.widgets import PoolModel, PoolMonitor, RestoreTimings, dashboard

ipywidgets = pytest.importorskip("ipywidgets")


def wait_for(pred, timeout_s=5.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def stats(**kw) -> PoolStats:
    base = dict(idle=0, in_use=0, max_size=4, min_size=1, max_in_use=None, creating=0, created=0, destroyed=0,
                hits=0, misses=0, failures=0, restores=0, releases=0, pending_destroy=0)  # fmt: skip
    base.update(kw)
    return PoolStats(**base)


# -- the model alone -------------------------------------------------------------------


def test_model_copies_stats_and_notifies_once_per_trait():
    m = PoolModel()
    seen = []
    m.observe(lambda ch: seen.append((ch["name"], ch["new"])), names=["idle", "hits", "max_in_use"])
    m.update(stats(idle=3, hits=7, max_in_use=2))
    assert (m.idle, m.hits, m.max_in_use, m.max_size) == (3, 7, 2, 4)
    assert sorted(seen) == [("hits", 7), ("idle", 3), ("max_in_use", 2)]
    seen.clear()
    m.update(stats(idle=3, hits=7, max_in_use=2))
    assert seen == []  # nothing changed, nothing fired
    m.update(stats(idle=3, hits=7))
    assert m.max_in_use is None


def test_model_mirrors_every_pool_stats_field():
    """A field added to PoolStats gets its trait (update() copies every field)."""
    from dataclasses import fields

    m = PoolModel()
    every = {f.name: 10 + i for i, f in enumerate(fields(PoolStats))}
    # setattr of a name with no trait would pass the copy below unobserved.
    assert set(every) <= set(m.trait_names()), set(every) - set(m.trait_names())
    m.update(PoolStats(**every))
    assert {name: getattr(m, name) for name in every} == every


def test_counters_of_optional_features_show_once_used():
    from kvmlab.widgets._monitor import counters_html

    m = PoolModel()
    m.update(stats(hits=2))
    assert ">hits<" in counters_html(m) and ">reuses<" not in counters_html(m)
    m.update(stats(hits=2, reuses=3, resets=3))
    assert m.reuses == 3 and ">reuses<" in counters_html(m) and "<b>3</b>" in counters_html(m)


def test_model_keeps_the_last_restore():
    m = PoolModel()
    t = kvmlab.RestoreTiming(5, 10, 20, 30, 40, 100, None, 1 << 24, False, "map")
    m.update(stats(restores=6), t)
    assert m.last_restore["seq"] == 5 and m.last_restore["strategy"] == "map" and m.last_restore["hit"] is False
    assert m.snapshot()["restores"] == 6


# -- on a real pool ------------------------------------------------------------------------



@pytest.fixture
def pool(kvm, service_snap):
    p = kvmlab.RestorePool(service_snap.config, kvmlab.PoolConfig(min_size=1, max_size=5))
    yield p
    p.close()


@pytest.fixture
def monitor(pool):
    m = PoolMonitor(pool, interval_s=0.1)
    yield m
    m.close()


def restore_some(pool, snap, n, strategy="copy"):
    for i in range(n):
        with pool.restore_snapshot(snap, strategy=strategy) as vm:
            assert vm.call(b"abc", op="reverse") == b"cba"


def test_monitor_shows_the_pool_at_creation(pool, monitor):
    s = pool.stats()
    m = monitor.model
    assert (m.idle, m.max_size, m.min_size, m.created) == (s.idle, 5, 1, s.created)
    assert (m.memory_mib, m.vcpus) == (16, 1)
    assert monitor.idle_bar.get_state()["max"] == 5
    assert monitor.idle_bar.value == s.idle
    assert monitor.idle_label.value.startswith(f"{s.idle} idle / 5 capacity")
    assert monitor.in_use_label.value == "0 in use / no limit"
    assert "16 MiB" in monitor.header.value
    assert "no restore yet" in monitor.last_restore.value
    assert monitor.target.max == 5 and monitor.target.value == 5
    assert monitor.warm_button.description == "Warm" and not monitor.warm_button.disabled
    for c in ("hits", "misses", "created", "destroyed", "failures"):
        assert f">{c}<" in monitor.counters.value


def test_warm_button_warms_off_the_main_thread(pool, monitor):
    callers = []
    real_warm = pool.warm

    def recording_warm(target):  # records who calls; the real pool does the work
        callers.append(threading.current_thread())
        return real_warm(target)

    pool.warm = recording_warm
    changes = []
    monitor.model.observe(lambda ch: changes.append(ch["new"]), names="idle")
    monitor.target.value = 4
    monitor.warm_button.click()
    monitor.wait_warm(10)
    assert callers and all(t is not threading.main_thread() for t in callers)
    assert pool.stats().idle == 4
    m = monitor.model
    assert m.idle == 4 and not m.warming and m.error == ""
    assert changes and changes[-1] == 4  # the observer saw the idle count grow
    assert monitor.idle_bar.value == 4
    assert monitor.idle_label.value.startswith("4 idle / 5 capacity")
    assert (monitor.warm_progress.value, monitor.warm_progress.max) == (4, 4)
    assert monitor.warm_progress.bar_style == "success"
    assert "warmed to 4" in monitor.status.value
    assert not monitor.warm_button.disabled
    assert monitor.warm_progress.layout.visibility == "visible"


def test_warm_progress_hides_once_the_pool_moves_on(pool, service_snap, monitor):
    assert monitor.warm_progress.layout.visibility == "hidden"  # no warm yet
    monitor.warm(3).join(10)
    assert monitor.warm_progress.layout.visibility == "visible"
    restore_some(pool, service_snap, 1)
    monitor.refresh()
    assert monitor.warm_progress.layout.visibility == "hidden"


def test_warm_target_is_bounded_by_max_size(pool, monitor):
    monitor.target.value = 99
    assert monitor.target.value == 5
    monitor.warm_button.click()
    monitor.wait_warm(10)
    assert pool.stats().idle == 5 == monitor.model.idle


def test_warm_from_code_past_max_size(pool, monitor):
    monitor.warm(50).join(10)
    assert pool.stats().idle == 5
    assert (monitor.warm_progress.value, monitor.warm_progress.max) == (5, 5)


def test_warm_with_a_bad_target_shows_the_error(monitor):
    monitor.warm(-1).join(10)
    assert monitor.model.error.startswith("ConfigError")
    assert "warm target" in monitor.status.value


def test_warm_while_warming_returns_the_running_thread(monitor, pool, monkeypatch):
    # The first warm is held at its first pool.warm() until the second call
    # was made, so it is surely still running then.
    gate = threading.Event()
    real_warm = pool.warm
    monkeypatch.setattr(pool, "warm", lambda n: (gate.wait(10), real_warm(n))[1])
    t1 = monitor.warm(5)
    t2 = monitor.warm(5)
    assert t1 is t2 and t1.is_alive()
    gate.set()
    monitor.wait_warm(10)
    assert not t1.is_alive() and pool.idle_count() == 5
    assert monitor.warm(5) is not t1  # a later call starts a new warm
    monitor.wait_warm(10)


def test_warm_errors_are_shown_not_swallowed(pool, monitor):
    pool.close()
    monitor.warm_button.click()
    monitor.wait_warm(10)
    assert "ClosedError" in monitor.model.error
    assert "error" in monitor.status.value and "ClosedError" in monitor.status.value
    assert monitor.warm_progress.bar_style == "danger"
    assert monitor.model.closed and monitor.warm_button.disabled
    assert "closed" in monitor.header.value
    assert monitor.refresh() is False


def test_restore_shows_counters_and_phases(pool, service_snap, monitor):
    restore_some(pool, service_snap, 3)
    monitor.refresh()
    s = pool.stats()
    m = monitor.model
    assert (m.hits, m.misses, m.restores) == (s.hits, s.misses, 3)
    last = pool.timings()[-1]
    assert m.last_restore["seq"] == last.seq == 2
    for p in ("acquire", "memory", "vcpu", "devices"):
        assert m.last_restore[f"{p}_ns"] == getattr(last, f"{p}_ns")
        assert p in monitor.last_restore.value
    assert "last restore #2 (copy" in monitor.last_restore.value
    assert m.last_restore["first_run_ns"] == last.first_run_ns > 0
    assert f"<b>{s.hits}</b>" in monitor.counters.value


def test_in_use_bar_follows_vms_out(pool, service_snap, monitor):
    vm = pool.restore_snapshot(service_snap)
    monitor.refresh()
    assert monitor.model.in_use == 1 and monitor.in_use_bar.value == 1
    assert monitor.in_use_label.value.startswith("1 in use")
    vm.release()
    monitor.refresh()
    assert monitor.model.in_use == 0


def test_timer_refreshes_while_displayed_and_stops_on_close(pool, service_snap):
    mon = PoolMonitor(pool, interval_s=0.05)
    assert not mon.auto_refreshing  # not displayed yet
    bundle = mon._repr_mimebundle_()  # what displaying it does
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert mon.auto_refreshing
    restore_some(pool, service_snap, 2)
    assert wait_for(lambda: mon.model.restores == 2)  # no refresh() call: the timer did it
    mon.close()
    assert not mon.auto_refreshing
    assert not any(t.name == "kvmlab-widget-refresh" and t.is_alive() for t in threading.enumerate())


def test_timer_stops_by_itself_when_the_pool_closes(pool):
    mon = PoolMonitor(pool, interval_s=0.05)
    mon.start()
    pool.close()
    assert wait_for(lambda: not mon.auto_refreshing)
    assert mon.model.closed
    mon.close()


def test_monitor_takes_only_a_pool():
    with pytest.raises(kvmlab.ConfigError):
        PoolMonitor(object())
    with pytest.raises(kvmlab.ConfigError):
        RestoreTimings(object())


# -- RestoreTimings ------------------------------------------------------------------------


def png_outputs(w):
    return [o for o in w.output.outputs if "image/png" in o.get("data", {})]


def test_restore_timings_rerenders_when_restores_happen(pool, service_snap):
    w = RestoreTimings(pool, interval_s=0.05)
    try:
        assert w.renders == 1 and len(png_outputs(w)) == 1  # "no restores yet"
        assert w.records == []
        restore_some(pool, service_snap, 4)
        assert w.refresh()
        assert w.renders == 2
        assert len(w.records) == 4 and "4 restores so far" in w.caption.value
        (ax_time, ax_phase) = w.figure.axes
        xs = [x for ln in ax_time.get_lines() for x in ln.get_xdata() if x == x]
        assert sorted(xs) == [0, 1, 2, 3]
        assert len(png_outputs(w)) == 1  # replaced, not appended
        w.refresh()
        assert w.renders == 2  # nothing new: no re-render
        w.refresh(force=True)
        assert w.renders == 3
        # Live: the timer picks up new restores.
        w._repr_mimebundle_()
        assert w.auto_refreshing
        restore_some(pool, service_snap, 1, strategy="copy")
        assert wait_for(lambda: len(w.records) == 5)
    finally:
        w.close()
    assert not w.auto_refreshing


def test_restore_timings_with_another_plot(pool, service_snap):
    restore_some(pool, service_snap, 2)
    w = RestoreTimings(pool, plot_fn=kvmlab.plot.latency_distribution, autostart=False)
    assert len(w.figure.axes[0].get_lines()) == 1
    w.close()


def test_restore_timings_on_a_closed_pool(pool):
    w = RestoreTimings(pool, autostart=False)
    pool.close()
    assert w.refresh() is False
    assert "closed" in w.caption.value
    w.close()


def test_dashboard(pool, service_snap):
    d = dashboard(pool, interval_s=0.05)
    assert isinstance(d.monitor, PoolMonitor) and isinstance(d.timings, RestoreTimings)
    restore_some(pool, service_snap, 1)
    d.refresh()
    assert d.monitor.model.restores == 1 and len(d.timings.records) == 1
    d.close()


# -- prepared VMs (issue 14 item 5) -------------------------------------------------------


def test_warm_control_prepares_a_snapshot_and_shows_it(pool, service_snap):
    monitor = PoolMonitor(pool, snapshots=[service_snap], interval_s=0.1, autostart=False)
    try:
        labels = [label for label, _ in monitor.warm_what.options]
        assert labels[0] == "idle shells" and any(label.startswith("prepare service 16 MiB") for label in labels)
        monitor.warm_what.value = service_snap
        monitor.target.value = 2
        monitor.warm_button.click()
        monitor.wait_warm(30)
        assert pool.prepared_count(service_snap) == 2
        m = monitor.model
        assert (m.prepared, m.error, m.warming) == (2, "", False)
        assert list(m.prepared_by_snapshot.values()) == [{"ready": 2, "target": 2}]
        assert "2 ready / 2" in monitor.prepared.value
        assert ", 2 prepared" in monitor.idle_label.value
        assert "prepared service" in monitor.status.value
        assert ">prepared<" in monitor.counters.value
        with pool.restore_snapshot(service_snap) as vm:  # a take shows at the next refresh
            assert vm.restore_timing["strategy"] == "prepared"
            monitor.refresh()
            assert m.last_restore["strategy"] == "prepared" and m.in_use == 1
    finally:
        monitor.close()


def test_snapshots_prepared_elsewhere_show_and_join_the_warm_menu(pool, service_snap, monitor):
    pool.prepare(service_snap, 1)
    monitor.refresh()
    assert "1 ready / 1" in monitor.prepared.value
    assert any(v is service_snap for _, v in monitor.warm_what.options)
    monitor.warm(0, snapshot=service_snap).join(30)  # 0 gives them up
    assert monitor.model.prepared == 0 and monitor.prepared.value == ""
    monitor.warm(9, snapshot=service_snap).join(30)  # over max_size: the error is shown
    assert monitor.model.error.startswith("ConfigError")
