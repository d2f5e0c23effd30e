"""Soak (60 s here and in CI; longer: python -m kvmlab.soak --seconds 600):
4 threads restore/run/release/warm/stats on one pool; afterwards no fd is
left open, mapped memory and RSS are back within 64 MiB of the start, every
counter adds up, and no restore produced memory that differs from its
snapshot."""

from __future__ import annotations

import os

import pytest

from kvmlab.soak import run_soak

pytestmark = [pytest.mark.kvm, pytest.mark.slow]


def test_soak():
    seconds = float(os.environ.get("KVMLAB_SOAK_SECONDS", "60"))
    rep = run_soak(seconds=seconds, threads=4)
    assert not rep.errors, rep.errors
    assert rep.restores > 0 and rep.runs == rep.restores == rep.releases
    assert rep.memory_checks > 0 and rep.memory_mismatches == 0
    assert rep.counters_ok, rep.final_stats
    before, after = rep.before, rep.after
    assert after.fds <= before.fds, (before, after)
    assert after.mapped_bytes <= before.mapped_bytes + (64 << 20), (before, after)
    assert after.rss_bytes <= before.rss_bytes + (64 << 20), (before, after)
    assert rep.max_live_vms <= 100, rep.max_live_vms  # the destroy backlog is bounded
    assert rep.ok
