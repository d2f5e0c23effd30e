"""Progress bars (tqdm.auto) of long library operations: shown once an
operation has run DELAY_S seconds, silenced by progress=False."""

from __future__ import annotations

import re

import pytest

from kvmlab import ConfigError, Snapshot, _progress, fork_many
from kvmlab.soak import run_soak

pytestmark = pytest.mark.kvm


@pytest.fixture
def no_delay(monkeypatch):
    """Bars show at once (the library waits DELAY_S before showing one)."""
    monkeypatch.setattr(_progress, "DELAY_S", 0.0)


def test_fork_many_and_close_show_progress(service_file, no_delay, capsys):
    with Snapshot.load(service_file) as snap:
        vms = fork_many(snap, 6)
        err = capsys.readouterr().err
        assert re.search(r"fork_many: .*\d/6 \[", err)
        vms.close()
    err = capsys.readouterr().err
    assert re.search(r"closing VMs: .*\d/6 \[", err)


def test_progress_false_is_silent(service_file, no_delay, capsys):
    with Snapshot.load(service_file) as snap:
        with fork_many(snap, 4, progress=False) as vms:
            assert len(vms) == 4
    assert capsys.readouterr().err == ""


def test_quick_operations_stay_silent(service_file, capsys):
    assert _progress.DELAY_S >= 1.0
    with Snapshot.load(service_file) as snap, fork_many(snap, 2):
        pass
    assert "fork_many" not in capsys.readouterr().err


def test_progress_must_be_a_bool(service_file):
    with Snapshot.load(service_file) as snap:
        with pytest.raises(ConfigError):
            fork_many(snap, 2, progress="yes")
    with pytest.raises(ConfigError):
        run_soak(seconds=0.1, progress=1)


@pytest.mark.slow
def test_soak_shows_seconds(no_delay, capsys):
    rep = run_soak(seconds=0.6, threads=2)
    err = capsys.readouterr().err
    assert re.search(r"soak: .*/0\.6 \[", err)
    assert rep.restores > 0 and not rep.errors
