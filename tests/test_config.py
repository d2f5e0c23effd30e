import dataclasses

import pytest

from kvmlab import ConfigError, VmConfig


def test_defaults():
    c = VmConfig()
    assert (c.memory_mib, c.vcpus) == (64, 1)
    assert c.memory_bytes == 64 << 20


@pytest.mark.parametrize("mib", [8, 10, 64, 4096])
def test_valid_memory(mib):
    assert VmConfig(memory_mib=mib).memory_bytes == mib * 1024 * 1024


@pytest.mark.parametrize("mib", [0, 7, 5000, 6, 9, 4098, -64, "64", True, 64.0, None])
def test_bad_memory(mib):
    with pytest.raises(ConfigError):
        VmConfig(memory_mib=mib)


@pytest.mark.parametrize("vcpus", [0, 9, -1, "1", True, 1.0, None])
def test_bad_vcpus(vcpus):
    with pytest.raises(ConfigError):
        VmConfig(vcpus=vcpus)


def test_config_error_is_value_error():
    with pytest.raises(ValueError) as e:
        VmConfig(memory_mib=7)
    assert (e.value.check, e.value.argument) == ("argument_range", "memory_mib")


def test_frozen():
    c = VmConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.vcpus = 2  # type: ignore[misc]
