"""Can kvmlab run here, and what will limit it? :func:`doctor` checks the host
and returns the answer as data.

    >>> report = kvmlab.doctor()
    >>> report.ok, report.kvm_module, report.cpl0_emulated
    (True, 'kvm_pvm', True)
    >>> report.to_dict()["limits"]
    {'nofile_soft': 20000, 'nofile_hard': 20000, 'max_map_count': 65530}

``kvmlab doctor`` prints the same report (``--json``: :meth:`DoctorReport.to_dict`);
in a notebook the report renders as a table.
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
import os
import platform
import resource
import shutil
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import _html

__all__ = [
    "doctor",
    "DoctorReport",
    "Check",
    "Status",
    "host_limits",
    "kvm_module",
    "REQUIRED_CAPS",
    "INFO_CAPS",
    "cpl_loop_image",
]

#: KVM capabilities kvmlab needs: (name, KVM_CAP_* number).
REQUIRED_CAPS = [
    ("IRQCHIP", 0),
    ("USER_MEMORY", 3),
    ("EXT_CPUID", 7),
    ("MP_STATE", 14),
    ("PIT2", 33),
    ("IMMEDIATE_EXIT", 136),
]
#: Capabilities shown for information (snapshot features, limits).
INFO_CAPS = [
    ("XSAVE", 55),
    ("XSAVE2", 208),
    ("XCRS", 56),
    ("VCPU_EVENTS", 41),
    ("DEBUGREGS", 50),
    ("ADJUST_CLOCK", 39),
    ("GET_TSC_KHZ", 61),
    ("MANUAL_DIRTY_LOG_PROTECT2", 168),
    ("DIRTY_LOG_RING", 192),
    ("MAX_VCPUS", 66),
    ("NR_MEMSLOTS", 10),
]
#: The KVM vendor modules doctor recognises, in the order they are looked for.
KVM_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")

#: Loop iterations of the CPL probe (two instructions each).
CPL_PROBE_ITERATIONS = 100_000
#: CPL0/CPL3 time ratio above which CPL0 counts as emulated.
CPL_EMULATED_RATIO = 10.0
#: The fork_many size the limits are judged against (README: n=1000 is the
#: density figure), and what one 1-vCPU map-restored VM holds of each limit.
LIMIT_TARGET_VMS = 1000
FDS_PER_VM = 3  # VM, vCPU, the snapshot file
MAPS_PER_VM = 4  # guest memory, vCPU run area, room for splits by copy-on-write

#: Optional tools: name -> (how to find it, how to get it).
TOOLS = {
    "QEMU": ("qemu-system-x86_64", "apt-get install qemu-system-x86 (benchmark rows)"),
    "unicorn": ("unicorn", 'pip install "kvmlab[bench]" (benchmark rows)'),
    "Dask": ("dask", 'pip install "dask[distributed]"'),
    "chromium": ("chromium", "apt-get install chromium fonts-liberation (browser test)"),
}


def cpl_loop_image(iterations: int) -> bytes:
    """x86_64: ``mov ecx, N; 1: dec ecx; jnz 1b; mov dx, 0x500; xor eax, eax; out dx, eax``."""
    return (
        b"\xb9" + iterations.to_bytes(4, "little")  # mov ecx, N
        + b"\xff\xc9"  # dec ecx
        + b"\x75\xfc"  # jnz -4
        + b"\x66\xba\x00\x05"  # mov dx, 0x500
        + b"\x31\xc0"  # xor eax, eax
        + b"\xef"  # out dx, eax
    )  # fmt: skip


class Status(str, enum.Enum):
    """How a check came out. Only ``FAIL`` means kvmlab cannot run."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    INFO = "info"


@dataclass(frozen=True)
class Check:
    """One line of the report.

    Attributes:
        name: what was checked (``"/dev/kvm"``, ``"cap IRQCHIP"``, ...).
        status: the outcome.
        detail: what was found.
        advice: what to do about it (empty when nothing is needed).
    """

    name: str
    status: Status
    detail: str
    advice: str = ""


@dataclass(frozen=True)
class DoctorReport:
    """What :func:`doctor` found: every check, plus the facts as fields.

    Attributes:
        checks: every check in the order it ran.
        versions: ``kvmlab``, ``core_abi``, ``python``, ``kernel``.
        kvm_module: ``"kvm_intel"``, ``"kvm_amd"``, ``"kvm_pvm"`` or None.
        capabilities: KVM capability name -> value (None: not offered).
        cpl0_emulated: whether guest CPL0 code is emulated (None: not measured).
        cpl0_ratio: CPL0 / CPL3 time of the probe loop (None: not measured).
        limits: ``nofile_soft``, ``nofile_hard``, ``max_map_count``.
        tools: optional tool -> where it was found, or None.
    """

    checks: tuple[Check, ...]
    versions: dict[str, str]
    kvm_module: str | None = None
    capabilities: dict[str, int | None] = field(default_factory=dict)
    cpl0_emulated: bool | None = None
    cpl0_ratio: float | None = None
    limits: dict[str, int | None] = field(default_factory=dict)
    tools: dict[str, str | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no check failed: kvmlab can run on this host."""
        return not self.failed

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status is Status.FAIL]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status is Status.WARN]

    def __getitem__(self, name: str) -> Check:
        """The check called ``name``; KeyError if it did not run."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (statuses as strings)."""
        d = asdict(self)
        d["checks"] = [dict(c, status=c["status"].value) for c in d["checks"]]
        d["ok"] = self.ok
        return d

    @property
    def verdict(self) -> str:
        if self.ok:
            return "kvmlab can run on this host."
        return "kvmlab cannot run on this host: fix the failed checks."

    def to_text(self, width: int = 80) -> str:
        """The report as a plain-text table, ``width`` columns wide."""
        w0 = max(len(c.name) for c in self.checks)
        w1 = max(len(c.status.value) for c in self.checks)
        indent = " " * (w0 + w1 + 4)
        lines = []
        for c in self.checks:
            head = f"{c.name:<{w0}}  {c.status.value:<{w1}}  "
            lines += textwrap.wrap(c.detail, width, initial_indent=head, subsequent_indent=indent) or [head.rstrip()]
            if c.advice:
                lines += textwrap.wrap(f"-> {c.advice}", width, initial_indent=indent, subsequent_indent=indent + "   ")
        return "\n".join(lines + ["", self.verdict])

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return (
            f"<DoctorReport {'ok' if self.ok else 'FAILED'}: {len(self.checks)} checks, "
            f"{len(self.failed)} failed, {len(self.warnings)} warnings, kvm_module={self.kvm_module}>"
        )

    def _repr_html_(self) -> str:
        rows = [(c.name, _html.badge(c.status.value), c.detail, c.advice) for c in self.checks]
        return _html.box(
            f"kvmlab doctor: {self.verdict}",
            _html.table(rows, ("check", "status", "found", "advice"), raw_cols=(1,)),
            "kvmlab-doctor",
        )


# -- facts ---------------------------------------------------------------------------


def kvm_module(sys_module: Path = Path("/sys/module"), proc_modules: Path = Path("/proc/modules")) -> str | None:
    """The loaded KVM vendor module (``kvm_intel``, ``kvm_amd``, ``kvm_pvm``) or None."""
    for name in KVM_MODULES:
        if (sys_module / name).is_dir():
            return name
    try:
        loaded = {line.split()[0] for line in proc_modules.read_text().splitlines() if line.strip()}
    except OSError:
        return None
    return next((name for name in KVM_MODULES if name in loaded), None)


def host_limits() -> dict[str, int | None]:
    """The host limits that bound how many VMs one process can hold:
    ``nofile_soft``/``nofile_hard`` (RLIMIT_NOFILE, -1 = unlimited) and
    ``max_map_count`` (``vm.max_map_count``; None if unreadable)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        maps: int | None = int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        maps = None
    return {"nofile_soft": int(soft), "nofile_hard": int(hard), "max_map_count": maps}


def _versions() -> dict[str, str]:
    from ._version import __version__ as version

    try:
        from . import _ffi

        abi = str(_ffi.ABI_VERSION)
    except ImportError:
        abi = "unavailable"
    return {"kvmlab": version, "core_abi": abi, "python": platform.python_version(), "kernel": platform.release()}


def _tools() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, (what, _) in TOOLS.items():
        if name in ("QEMU", "chromium"):
            out[name] = shutil.which(what) or (shutil.which("chromium-browser") if name == "chromium" else None)
        elif importlib.util.find_spec(what) is not None:
            try:
                out[name] = f"{what} {importlib.metadata.version(what)}"
            except importlib.metadata.PackageNotFoundError:
                out[name] = what
        else:
            out[name] = None
    return out


# -- checks ----------------------------------------------------------------------------


class _Run:
    """The checks so far and the facts they found."""

    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.facts: dict[str, Any] = {}

    def add(self, name: str, status: Status, detail: str, advice: str = "") -> None:
        self.checks.append(Check(name, status, detail, advice))

    def report(self) -> DoctorReport:
        return DoctorReport(tuple(self.checks), **self.facts)


def _check_device(run: _Run) -> bool:
    dev = "/dev/kvm"
    if not os.path.exists(dev):
        run.add(dev, Status.FAIL, "missing", "enable virtualization (VT-x/AMD-V, nested) and load kvm_intel or kvm_amd")
        return False
    if not os.access(dev, os.R_OK | os.W_OK):
        run.add(dev, Status.FAIL, "no access", "add your user to the 'kvm' group (sudo usermod -aG kvm $USER), log in again")
        return False
    run.add(dev, Status.OK, "present and accessible")
    return True


def _check_kvm_api(run: _Run) -> bool:
    from . import _ffi
    from .errors import KvmlabError

    ffi, lib = _ffi.ffi, _ffi.lib
    info = ffi.new("kvmlab_host_info *")
    try:
        _ffi.check(lib.kvmlab_host_info_get(info))
    except KvmlabError as e:
        run.add("KVM API", Status.FAIL, str(e), "check dmesg for KVM errors")
        return False
    api = int(info.api_version)
    run.add("KVM API version", Status.OK if api == 12 else Status.WARN, str(api), "" if api == 12 else "expected 12")
    run.add("host CPUID entries", Status.OK, str(info.cpuid_entries))
    value = ffi.new("uint64_t *")
    caps: dict[str, int | None] = {}
    for name, number in REQUIRED_CAPS + INFO_CAPS:
        try:
            _ffi.check(lib.kvmlab_host_check_extension(number, value))
            caps[name] = int(value[0]) or None
        except KvmlabError:
            caps[name] = None
    run.facts["capabilities"] = caps
    ok = True
    for name, _ in REQUIRED_CAPS:
        if caps[name]:
            run.add(f"cap {name}", Status.OK, f"required ({caps[name]})")
        else:
            ok = False
            run.add(f"cap {name}", Status.FAIL, "missing, required by kvmlab", "use a host kernel whose KVM offers it")
    for name, _ in INFO_CAPS:
        run.add(f"cap {name}", Status.INFO, f"yes ({caps[name]})" if caps[name] else "no (optional)")
    return ok


def _probe_cpl(cpl: int) -> tuple[int | None, str]:
    """Runs the probe loop at ``cpl``: (elapsed ns or None, what went wrong)."""
    from .errors import KvmlabError
    from .vm import Vm

    try:
        with Vm.boot(cpl_loop_image(CPL_PROBE_ITERATIONS), cpl=cpl) as vm:
            r = vm.run(timeout_s=30.0)
    except KvmlabError as e:
        return None, str(e)
    if r.reason != "exit" or r.exit_code != 0:
        return None, f"reason {r.reason}, exit code {r.exit_code}"
    return r.elapsed_ns, ""


def _check_guests(run: _Run) -> bool:
    from .units import fmt_time

    times: dict[int, int] = {}
    for cpl in (3, 0):
        ns, problem = _probe_cpl(cpl)
        if ns is None:
            status = Status.FAIL if cpl == 3 else Status.WARN
            run.add(f"guest at CPL{cpl}", status, f"failed: {problem}", "run the test suite for details")
            continue
        times[cpl] = ns
        run.add(f"guest at CPL{cpl}", Status.OK, f"{CPL_PROBE_ITERATIONS} loop iterations in {fmt_time(ns)}")
    if 3 in times and 0 in times:
        ratio = times[0] / max(times[3], 1)
        emulated = ratio > CPL_EMULATED_RATIO
        run.facts.update(cpl0_ratio=round(ratio, 1), cpl0_emulated=emulated)
        if emulated:
            run.add("CPL0 speed", Status.INFO, f"CPL0 emulated (ratio {ratio:.0f}x)", "keep CPL0 guests short; CPL3 runs natively")
        else:
            run.add("CPL0 speed", Status.INFO, f"CPL0 native (ratio {ratio:.1f}x)")
    return 3 in times


def _check_limits(run: _Run) -> None:
    lim = host_limits()
    run.facts["limits"] = lim
    need_fds = LIMIT_TARGET_VMS * FDS_PER_VM
    soft, hard = lim["nofile_soft"], lim["nofile_hard"]
    assert hard is not None, "host_limits() always reads RLIMIT_NOFILE"
    unlimited = hard == resource.RLIM_INFINITY
    _check_limit(
        run, "open files", unlimited or hard >= need_fds,
        f"soft {soft}, hard {'unlimited' if unlimited else hard} (fork_many raises soft to hard)", f"soft {soft}, hard {hard}",
        f"each VM holds {FDS_PER_VM} descriptors; raise the hard limit (ulimit -Hn, /etc/security/limits.conf)",
    )  # fmt: skip
    maps = lim["max_map_count"]
    if maps is None:
        run.add("vm.max_map_count", Status.INFO, "unreadable")
    else:
        _check_limit(
            run, "vm.max_map_count", maps >= LIMIT_TARGET_VMS * MAPS_PER_VM,
            f"{maps} (about {maps // MAPS_PER_VM} VMs per process)", f"{maps}",
            f"raise it: sysctl vm.max_map_count={LIMIT_TARGET_VMS * MAPS_PER_VM * 4}",
        )  # fmt: skip


def _check_limit(run: _Run, name: str, enough: bool, ok: str, have: str, hint: str) -> None:
    """OK when a host limit lets ``LIMIT_TARGET_VMS`` VMs fit, else a warning with how to raise it."""
    if enough:
        run.add(name, Status.OK, ok)
    else:
        run.add(name, Status.WARN, f"{have}: fewer than {LIMIT_TARGET_VMS} VMs fit", hint)


def _check_tools(run: _Run) -> None:
    tools = _tools()
    run.facts["tools"] = tools
    for name, where in tools.items():
        if where:
            run.add(name, Status.INFO, f"present: {where}")
        else:
            run.add(name, Status.INFO, "absent", TOOLS[name][1])


def doctor(probe_guests: bool = True) -> DoctorReport:
    """Checks whether kvmlab can run on this host and what limits it.

    Looks at the versions, the native core, ``/dev/kvm``, the KVM module and
    API, the capabilities kvmlab needs, boots a probe guest at CPL3 and CPL0
    (is CPL0 emulated here?), the limits ``fork_many`` meets first (open files,
    ``vm.max_map_count``) and which optional tools are installed. It never
    raises for a host problem: problems are checks with status ``fail``.

    Args:
        probe_guests: boot the CPL3/CPL0 probe guests (about a second on
            hosts that emulate CPL0).

    Returns:
        A :class:`DoctorReport`; ``report.ok`` is False if kvmlab cannot run.
    """
    run = _Run()
    versions = _versions()
    run.facts["versions"] = versions
    run.add("versions", Status.INFO, ", ".join(f"{k} {v}" for k, v in versions.items()))
    module = kvm_module()
    run.facts["kvm_module"] = module
    if module:
        run.add("KVM module", Status.OK, module)
    else:
        run.add("KVM module", Status.WARN, f"none of {', '.join(KVM_MODULES)} found", "load kvm_intel or kvm_amd")
    try:
        from . import _ffi
    except ImportError as e:
        run.add("native core", Status.FAIL, str(e), "pip install -e . (from the kvmlab source tree)")
    else:
        run.add("native core", Status.OK, f"{_ffi.LIBRARY_PATH} (ABI {_ffi.ABI_VERSION})")
        if _check_device(run) and _check_kvm_api(run) and probe_guests:
            _check_guests(run)
    _check_limits(run)
    _check_tools(run)
    return run.report()
