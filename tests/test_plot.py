"""kvmlab.plot: functions of timing data returning matplotlib Figures."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

import kvmlab
from kvmlab import RestoreTiming
from kvmlab import plot as kp


def rec(seq, total_us, strategy="copy", hit=True, mib=64, phases=None):
    acq, mem, vcpu, dev = phases or (1_000, int(total_us * 1000) - 80_000, 70_000, 9_000)
    return RestoreTiming(seq, acq, mem, vcpu, dev, acq + mem + vcpu + dev, None, mib << 20, hit, strategy)


@pytest.fixture
def records():
    out = []
    for i in range(40):
        strategy = "copy" if i % 2 == 0 else "map"
        total = (200 + i) if strategy == "copy" else (100 + i)
        out.append(rec(i, total, strategy, hit=(i % 10 != 3), mib=64 if i < 20 else 256))
    return out


def suptitle(fig: Figure) -> str:
    return fig.get_suptitle()


# -- data handling -------------------------------------------------------------------


def test_frame_from_records_dataframe_and_dicts(records):
    df = kp.frame(records)
    assert len(df) == 40
    assert set(df["memory_mib"]) == {64, 256}
    assert set(df["mode"]) == {"pooled"}
    assert df["hit"].dtype == bool
    df2 = kp.frame(kvmlab.timings_frame(records))
    pd.testing.assert_frame_equal(df, df2)
    df3 = kp.frame([{"memory_ns": 5, "acquire_ns": 1, "vcpu_ns": 2, "devices_ns": 3}])
    assert df3["total_ns"].tolist() == [11]
    assert kp.frame([]).empty
    with pytest.raises(TypeError):
        kp.frame([object()])


def test_frame_does_not_modify_its_input(records):
    df = kvmlab.timings_frame(records)
    cols = list(df.columns)
    kp.frame(df)
    assert list(df.columns) == cols


@pytest.mark.parametrize(
    "values,unit",
    [([500, 700], "ns"), ([120_000, 90_000], "µs"), ([3e6, 5e6, 100], "ms"), ([2e9], "s"), ([], "µs")],
)
def test_choose_unit(values, unit):
    assert kp.choose_unit(values)[0] == unit


def test_host_label_names_host_and_cpu():
    import socket

    label = kp.host_label()
    assert label.startswith(socket.gethostname())
    assert "CPU" in label


# -- figures ----------------------------------------------------------------------------


def test_latency_distribution_ecdf(records):
    fig = kp.latency_distribution(records, by="strategy")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert "µs" in ax.get_xlabel()
    lines = ax.get_lines()
    assert [ln.get_label().split()[0] for ln in lines] == ["copy", "map"]
    want = sorted(r.total_ns / 1e3 for r in records if r.strategy == "copy")
    np.testing.assert_allclose(lines[0].get_xdata(), want)
    assert lines[0].get_ydata()[-1] == pytest.approx(1.0)
    assert "n=20" in lines[0].get_label() and "median" in lines[0].get_label()
    assert "Restore latency" in suptitle(fig) and kp.host_label() in suptitle(fig)


def test_latency_distribution_hist(records):
    fig = kp.latency_distribution(records, by="strategy", kind="hist")
    (ax,) = fig.axes
    assert len(ax.patches) == 2  # one step outline per strategy
    assert ax.get_ylabel() == "restores"
    with pytest.raises(ValueError):
        kp.latency_distribution(records, kind="violin")


def test_phase_breakdown_stacks_the_medians(records):
    fig = kp.phase_breakdown(records, by=("strategy", "memory_mib"))
    (ax,) = fig.axes
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_label() for b in bars] == list(kp.PHASES)
    assert all(len(b) == 4 for b in bars)  # copy/map x 64/256
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["copy\n64 MiB", "copy\n256 MiB", "map\n64 MiB", "map\n256 MiB"]
    df = kp.frame(records)
    sub = df[(df.strategy == "copy") & (df.memory_mib == 64)]
    unit, scale = kp.choose_unit([sub[[f"{p}_ns" for p in kp.PHASES]].median().sum()])
    for b, p in zip(bars, kp.PHASES):
        assert b.patches[0].get_height() == pytest.approx(sub[f"{p}_ns"].median() / scale)
    # stacked: each phase starts where the previous ended
    assert bars[1].patches[0].get_y() == pytest.approx(bars[0].patches[0].get_height())
    assert unit in ax.get_ylabel()
    assert "phases" in suptitle(fig)


def test_latency_over_time_marks_misses(records):
    fig = kp.latency_over_time(records, by="strategy")
    (ax,) = fig.axes
    misses = [r for r in records if not r.hit]
    (sc,) = ax.collections
    assert len(sc.get_offsets()) == len(misses) == 4
    np.testing.assert_allclose(sc.get_offsets()[:, 0], [r.seq for r in misses])
    assert sc.get_label() == "pool miss (4)"
    assert len(ax.get_lines()) == 2
    assert ax.get_xlabel() == "restore index"
    assert ax.get_yscale() == "log"


def test_latency_over_time_unpooled_restores_are_not_misses():
    rows = [dict(total_ns=1_000_000, hit=False, mode="unpooled", strategy="copy", seq=i) for i in range(5)]
    (ax,) = kp.latency_over_time(rows).axes
    assert len(ax.collections[0].get_offsets()) == 0


def test_latency_vs_memory_one_line_per_group():
    rows = []
    for mib, base in ((64, 100), (128, 200), (256, 400)):
        for strategy, k in (("copy", 10), ("map", 1)):
            for mode in ("pooled", "unpooled"):
                for i in range(5):
                    rows.append(
                        dict(memory_mib=mib, strategy=strategy, mode=mode, hit=True,
                             total_ns=(base * k + i + (500 if mode == "unpooled" else 0)) * 1000)
                    )  # fmt: skip
    fig = kp.latency_vs_memory(pd.DataFrame(rows))
    (ax,) = fig.axes
    ebs = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert sorted(e.get_label() for e in ebs) == ["copy pooled", "copy unpooled", "map pooled", "map unpooled"]
    copy_pooled = next(e for e in ebs if e.get_label() == "copy pooled")
    line = copy_pooled.lines[0]
    np.testing.assert_allclose(line.get_xdata(), [64, 128, 256])
    np.testing.assert_allclose(line.get_ydata(), [1.002, 2.002, 4.002])  # medians in ms
    assert "ms" in ax.get_ylabel() and "MiB" in ax.get_xlabel()


def test_restore_overview_has_two_panels(records):
    fig = kp.restore_overview(records)
    assert len(fig.axes) == 2
    assert "40 shown" in suptitle(fig)


@pytest.mark.parametrize(
    "fn", [kp.latency_distribution, kp.phase_breakdown, kp.latency_over_time, kp.latency_vs_memory, kp.restore_overview]
)
def test_empty_data_gives_a_figure_saying_so(fn):
    fig = fn([])
    assert isinstance(fig, Figure)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "no restores yet" in texts
    assert kp.to_png(fig).startswith(b"\x89PNG")


def test_no_pyplot_state():
    """The module never touches pyplot (safe from threads and in Agg-only processes)."""
    code = textwrap.dedent(
        """
        import sys
        from kvmlab import RestoreTiming, plot
        recs = [RestoreTiming(i, 1, 2000, 3000, 4, 5005, None, 1 << 26, i % 3 > 0, "copy") for i in range(9)]
        for f in (plot.latency_distribution, plot.phase_breakdown, plot.latency_over_time,
                  plot.latency_vs_memory, plot.restore_overview):
            plot.to_png(f(recs))
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(kvmlab.__file__).parent.parent))


@pytest.mark.kvm
def test_plots_of_a_real_pool():
    with kvmlab.Vm.boot("service", kvmlab.VmConfig(memory_mib=16)) as vm:
        vm.run()
        snap = vm.snapshot()
    with kvmlab.RestorePool(snap.config, kvmlab.PoolConfig(min_size=1, max_size=3)) as pool:
        pool.warm(3)
        for _ in range(5):
            with pool.restore_snapshot(snap, strategy="copy") as rvm:
                assert rvm.call(b"abc", op="reverse") == b"cba"
        timings = pool.timings()
    snap.close()
    fig = kp.latency_distribution(timings)
    (line,) = fig.axes[0].get_lines()
    assert len(line.get_xdata()) == 5
    fig = kp.phase_breakdown(timings, by="strategy")
    assert len(fig.axes[0].containers) == 4
    assert kp.to_png(kp.restore_overview(timings)).startswith(b"\x89PNG")


# -- reset and fork (notebook 06) ------------------------------------------------------


def test_reset_vs_dirty_pages_draws_medians_per_page_count():
    from kvmlab.vm import LoopResult, ResetTiming

    loops = [LoopResult("exit", 0, 0, False, 1000, t, k, 0) for k, t in ((3, 50_000), (3, 70_000), (66, 80_000), (1026, 900_000))]
    fig = kp.reset_vs_dirty_pages(loops)
    ax = fig.axes[0]
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [3, 66, 1026]
    assert list(line.get_ydata()) == pytest.approx([60, 80, 900])  # µs medians
    assert ax.get_xscale() == ax.get_yscale() == "log" and "µs" in ax.get_ylabel()
    # ResetTiming records (total_ns) and an Axes of the caller work too.
    from matplotlib.figure import Figure as F

    host = F()
    ax2 = host.add_subplot()
    assert kp.reset_vs_dirty_pages([ResetTiming(0, 1, 1, 1, 1, 4_000)], ax=ax2) is host
    assert list(ax2.get_lines()[0].get_xdata()) == [1]  # 0 pages drawn at 1 on the log axis
    assert "no resets" in kp.reset_vs_dirty_pages([]).axes[0].texts[0].get_text()
    # match= on text: the plot helpers raise plain ValueError (not a KvmlabError), which has no check id.
    with pytest.raises(ValueError, match="dirty_pages"):
        kp.reset_vs_dirty_pages([{"total_ns": 5}])


def test_fork_ready_vs_n_draws_ready_and_per_vm():
    rows = [{"n": 10, "ready_ns": 10e6}, {"n": 10, "ready_ns": 30e6}, {"n": 100, "ready_ns": 200e6}]
    fig = kp.fork_ready_vs_n(rows)
    ready, per_vm = fig.axes[0].get_lines()[0], fig.axes[1].get_lines()[0]
    assert list(ready.get_xdata()) == [10, 100] and list(ready.get_ydata()) == pytest.approx([20, 200])  # ms
    assert list(per_vm.get_ydata()) == pytest.approx([2, 2])  # ms per VM
    assert "ms" in fig.axes[0].get_ylabel() and "per VM" in fig.axes[1].get_ylabel()
    assert "no forks" in kp.fork_ready_vs_n([]).axes[0].texts[0].get_text()


def test_reset_vs_dirty_pages_by_a_setting():
    rows = [{"pages": 1, "dirty_pages": k, "total_ns": t} for k, t in ((3, 40_000), (4, 80_000), (3, 50_000))]
    rows += [{"pages": 64, "dirty_pages": 66, "total_ns": 90_000}]
    line = kp.reset_vs_dirty_pages(rows, by="pages").axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [3, 66] and list(line.get_ydata()) == pytest.approx([50, 90])
    with pytest.raises(ValueError, match="nope"):
        kp.reset_vs_dirty_pages(rows, by="nope")
