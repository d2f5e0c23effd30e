"""kvmlab.guests.build_zig: compile a user guest with the packaged Zig."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvmlab
from kvmlab import GuestError
from kvmlab.guests import build_zig, guest_sdk_dir

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("ziglang")


def guest_source(main_body: str) -> str:
    """A Zig guest on the SDK's runtime: its preamble, then ``main`` with ``main_body``."""
    preamble = 'const rt = @import("rt.zig");\npub const panic = rt.panic;\ncomptime {\n    rt.exportEntry(main);\n}\n'
    return f"{preamble}fn main(vcpu: u64) noreturn {{\n{main_body}}}\n"


#: The built-in hello guest's logic (zigsrc/guests/hello.zig), from a string.
HELLO = guest_source("""\
    if (vcpu == 0) rt.write("hello from kvmlab guest\\n");
    rt.exit(0);
""")

COUNTDOWN = guest_source("""\
    if (vcpu != 0) rt.exit(0);
    var n = rt.argU64("from", 3);
    while (n > 0) : (n -= 1) {
        var l: rt.Line = .{};
        l.dec(n);
        l.str("\\n");
        l.flush();
        rt.checkpoint(@truncate(n));
    }
    rt.exit(42);
""")


def test_sdk_is_found():
    d = guest_sdk_dir()
    assert (d / "rt.zig").is_file() and (d / "guest.ld").is_file()


def test_builds_a_guest_image():
    g = build_zig(HELLO, name="hello_again")
    assert isinstance(g, kvmlab.Guest) and g.name == "hello_again" and not g.is_elf
    assert g.image == kvmlab.Guest.builtin("hello").image  # byte for byte


@pytest.mark.checkout
@pytest.mark.parametrize("name", ["counter", "service"])
def test_same_recipe_as_the_builtin_guests(name):
    src = REPO / "zigsrc" / "guests" / f"{name}.zig"
    if not src.is_file():
        pytest.skip("needs the kvmlab source tree (zigsrc/guests)")
    assert build_zig(src, name=name).image == kvmlab.Guest.builtin(name).image  # byte for byte


def test_source_from_a_file_and_keep_dir(tmp_path):
    src = tmp_path / "countdown.zig"
    src.write_text(COUNTDOWN)
    out = tmp_path / "out"
    g = build_zig(src, name="countdown", keep_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["countdown.bin", "countdown.elf", "countdown.zig"]
    assert (out / "countdown.bin").read_bytes() == g.image


def test_compile_errors_are_guest_errors_with_the_message():
    with pytest.raises(GuestError) as e:
        build_zig("fn main() void { nope(); }", name="broken")
    assert e.value.check == "guest_build"
    msg = str(e.value)  # the compiler's message is passed on: what this test is about
    assert "zig build-exe failed for guest 'broken'" in msg
    assert "nope" in msg and "/tmp/" not in msg


@pytest.mark.parametrize("bad", ["", "  \n"])
def test_empty_source(bad):
    with pytest.raises(GuestError) as e:
        build_zig(bad)
    assert e.value.check == "source_empty"


@pytest.mark.parametrize("name", ["", "a b", "../x", "x" * 80, 3])
def test_bad_names(name):
    with pytest.raises(GuestError):
        build_zig(HELLO, name=name)


def test_missing_sdk_is_explained(tmp_path, monkeypatch):
    import kvmlab.guests as g

    monkeypatch.setenv("KVMLAB_GUEST_SDK", str(tmp_path))
    assert g.guest_sdk_dir() != tmp_path  # incomplete: falls through to the next place
    for f in g.GUEST_SDK_FILES:
        (tmp_path / f).write_text("")
    assert g.guest_sdk_dir() == tmp_path
    # Found nowhere: the error says where it looked and what to set.
    monkeypatch.setattr(g, "GUEST_SDK_FILES", ("absent-everywhere.zig",))
    with pytest.raises(GuestError) as e:
        g.guest_sdk_dir()
    assert e.value.check == "guest_sdk"
    # The message must say where it looked and what to set: that is what this test is about.
    assert str(tmp_path) in str(e.value) and "KVMLAB_GUEST_SDK" in str(e.value)


def test_missing_zig_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ziglang", None)  # find_spec() -> None: as if not installed
    with pytest.raises(GuestError) as e:
        build_zig(HELLO, name="no_zig")
    assert e.value.check == "missing_extra" and "kvmlab[guests]" in str(e.value)  # names the extra to install


@pytest.mark.kvm
def test_boot_snapshot_restore_a_built_guest():
    g = build_zig(COUNTDOWN, name="countdown")
    with kvmlab.Vm.boot(g, kvmlab.VmConfig(memory_mib=16), args={"from": 3}) as vm:
        r = vm.run()
        assert (r.reason, r.checkpoint_tag, r.console) == ("checkpoint", 3, "3\n")
        snap = vm.snapshot()
        rest = vm.run_until_exit()
    assert rest.exit_code == 42 and rest.console == "2\n1\n"
    assert snap.guest == "countdown"
    with kvmlab.Vm.restore(snap) as vm2:
        again = vm2.run_until_exit()
    assert (again.exit_code, again.console) == (42, "2\n1\n")
    snap.close()


@pytest.mark.kvm
def test_cell_magic():
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    try:
        ip.run_line_magic("load_ext", "kvmlab.guests")
        ip.run_cell_magic("kvmlab_guest", "hi", HELLO)
        g = ip.user_ns["hi"]
        assert isinstance(g, kvmlab.Guest) and g.name == "hi"
        with kvmlab.Vm.boot(g) as vm:
            assert vm.run().console == "hello from kvmlab guest\n"
        with pytest.raises(GuestError) as e:
            ip.run_cell_magic("kvmlab_guest", "", HELLO)
        assert e.value.check == "magic_usage"
    finally:
        InteractiveShell.clear_instance()
