"""Records a fresh shell already has are not set again (zigsrc/state.zig,
``skip_if_default``: each KVM call costs ~15-20 us on kvm_pvm), and every
record that differs from a fresh shell's is set: a VM restored and
snapshotted again, without running, gives back the snapshot's records."""

from __future__ import annotations

import struct

import pytest

import snapshot_codec as C
from conftest import CFG
from kvmlab import PoolConfig, RestorePool, Snapshot, Vm, VmConfig

pytestmark = pytest.mark.kvm

#: The records restore skips when a fresh shell has them already (tags of zigsrc/state.zig).
SKIP_IF_DEFAULT = {5: "xcrs", 8: "mp_state", 9: "events", 10: "debugregs", 32: "pic_master", 33: "pic_slave",
                   34: "ioapic"}


def _records(snap: Snapshot) -> dict[tuple[int, int], bytes]:
    _, recs = C.parse_state(snap.vcpu_state)
    return {(r.tag, r.vcpu): r.data for r in recs if r.tag in SKIP_IF_DEFAULT}


@pytest.mark.parametrize("vcpus", [1, 2])
def test_a_restored_vm_has_every_record_of_its_snapshot_default_or_not(vcpus):
    cfg = VmConfig(memory_mib=CFG.memory_mib, vcpus=vcpus)
    with Vm.boot("counter", cfg, args={"steps": 8, "checkpoint_at": 4}) as vm:
        vm.run()
        data = vm.snapshot().to_bytes()
    header, recs = C.parse_state(C.state_of(data))
    # Debug address register 0 of vCPU 0 made non-default (DR7 leaves it
    # disabled): a record a fresh shell does not have must be set.
    dr = C.find(recs, 10, 0)
    dr.data = struct.pack("<Q", 0x1234_5000) + dr.data[8:]
    with Snapshot.from_bytes(C.with_state(data, C.build_state(header, recs))) as snap:
        want = _records(snap)
        assert set(tag for tag, _ in want) == set(SKIP_IF_DEFAULT)  # all are in the blob
        with RestorePool(cfg, PoolConfig(min_size=1, max_size=2)) as pool:
            for _ in range(2):  # the second restore uses the memo of the first
                with pool.restore_snapshot(snap) as rvm, rvm.snapshot() as again:
                    got = _records(again)
                    for key, data_ in want.items():
                        assert got[key] == data_, SKIP_IF_DEFAULT[key[0]]
                    assert got[10, 0][:8] == struct.pack("<Q", 0x1234_5000)
