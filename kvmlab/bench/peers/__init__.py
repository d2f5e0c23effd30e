"""kvmlab's peers on the same machine: QEMU (:mod:`.qemu`) and unicorn (:mod:`.unicorn`)."""
