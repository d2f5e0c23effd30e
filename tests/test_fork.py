"""fork_many: many map restores of one snapshot file, sharing its pages."""

from __future__ import annotations

import hashlib
import os

import pytest

import kvmlab
from kvmlab import ConfigError, Snapshot, fork_many

pytestmark = pytest.mark.kvm


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fork_many_gives_independent_vms_sharing_the_file(service_file):
    digest = hashlib.sha256(service_file.read_bytes()).hexdigest()
    fds = _fds()
    with Snapshot.load(service_file) as snap:
        with fork_many(snap, 20) as vms:
            assert len(vms) == 20
            assert vms.stats.n == 20 and vms.ready_ns > 0
            # Every VM answers, and writes in one are not seen by another.
            for i, vm in enumerate(vms):
                assert vm.call(f"vm {i}".encode()) == f"vm {i}".encode()
            vms[0].write_memory(0x900000, b"only in vm 0")
            assert vms[1].read_memory(0x900000, 12) == bytes(12)
            assert vms[0].read_memory(0x900000, 12) == b"only in vm 0"
    assert hashlib.sha256(service_file.read_bytes()).hexdigest() == digest
    assert _fds() <= fds


def test_fork_many_needs_a_file_backed_snapshot(service_file):
    with Snapshot.load(service_file) as fs:
        data = fs.to_bytes()
    with Snapshot.from_bytes(data) as mem_snap:
        with pytest.raises(ConfigError) as e:
            fork_many(mem_snap, 2)
        assert e.value.check == "strategy_needs_file"
    with Snapshot.load(service_file) as fs:
        for bad in (0, -1, True, 1.5):
            with pytest.raises(ConfigError):
                fork_many(fs, bad)
