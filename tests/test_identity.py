"""Per-clone identity (issue 14 item 7): fork_many and RestorePool.prepare can
give each VM a distinct identity the guest reads through ports 0x503/0x504
(docs/guest-protocol.md); a VM nobody gives one reads 0, so callers who do
not ask keep VMs that are the snapshot, bit for bit."""

from __future__ import annotations

import pytest

from conftest import CFG
from kvmlab import ConfigError, PoolConfig, RestorePool, Snapshot, Vm, fork_many

pytestmark = pytest.mark.kvm

#: checkpoint 0x1234 (the snapshot is taken here); then checkpoint with tag =
#: the identity's low 32 bits (in from 0x503), then exit with code = its high
#: 32 bits (in from 0x504).
IDENTITY_GUEST = bytes.fromhex(
    "66ba0105" "b834120000" "ef"  # mov dx,0x501; mov eax,0x1234; out dx,eax
    "66ba0305" "ed" "66ba0105" "ef"  # mov dx,0x503; in eax,dx; mov dx,0x501; out dx,eax
    "66ba0405" "ed" "66ba0005" "ef"  # mov dx,0x504; in eax,dx; mov dx,0x500; out dx,eax
    "ebfe"  # jmp $
)


@pytest.fixture(scope="module")
def identity_file(tmp_path_factory):
    with Vm.boot(IDENTITY_GUEST, CFG) as vm:
        r = vm.run(timeout_s=10)
        assert (r.reason, r.checkpoint_tag) == ("checkpoint", 0x1234)
        with vm.snapshot() as snap:
            return snap.save(tmp_path_factory.mktemp("identity") / "identity.kvmsnap")


def guest_reads(vm) -> int:
    """What the guest read from ports 0x503 (low) and 0x504 (high)."""
    r = vm.run(timeout_s=10)
    assert r.reason == "checkpoint"
    low = r.checkpoint_tag
    r = vm.run(timeout_s=10)
    assert r.reason == "exit"
    return r.exit_code << 32 | low


def test_fork_many_gives_distinct_identities_the_guest_reads(identity_file):
    with Snapshot.load(identity_file) as fs, fork_many(fs, 4, identity=True, progress=False) as vms:
        ids = [vm.identity for vm in vms]
        assert len(set(ids)) == 4 and 0 not in ids
        assert [guest_reads(vm) for vm in vms] == ids


def test_without_identity_every_clone_reads_zero(identity_file):
    with Snapshot.load(identity_file) as fs, fork_many(fs, 2, progress=False) as vms:
        assert [vm.identity for vm in vms] == [0, 0]
        assert [guest_reads(vm) for vm in vms] == [0, 0]


def test_prepared_takes_get_a_fresh_identity_each(identity_file):
    with RestorePool(CFG, PoolConfig(min_size=0, max_size=3)) as pool, Snapshot.load(identity_file) as fs:
        pool.prepare(fs, 1, identity=True)
        seen = []
        for _ in range(3):
            with pool.restore_snapshot(fs) as vm:
                assert vm.restore_timing["strategy"] == "prepared"
                seen.append(vm.identity)
                assert guest_reads(vm) == seen[-1]
            while pool.prepared_count(fs) < 1:
                pass
        assert len(set(seen)) == 3 and 0 not in seen
        pool.prepare(fs, 1)  # no identity asked: the guest reads 0
        with pool.restore_snapshot(fs) as vm:
            assert guest_reads(vm) == 0


def test_set_identity_checks_its_argument(identity_file):
    with Snapshot.load(identity_file) as fs, Vm.restore(fs) as vm:
        vm.set_identity(2**64 - 1)
        assert guest_reads(vm) == 2**64 - 1
        for bad in (-1, 2**64, "1", 1.5):
            with pytest.raises(ConfigError):
                vm.set_identity(bad)
    with pytest.raises(ConfigError):
        fork_many(fs, 1, identity="yes")
