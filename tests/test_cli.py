import re
import subprocess
import sys
from pathlib import Path

import pytest

import kvmlab
from kvmlab import cli, demo


@pytest.mark.kvm
def test_demo_shows_unpooled_pooled_and_prepared_restores(capsys):
    assert cli.main(["demo", "--n", "20"]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert "service, 64 MiB" in out and "20 restores per path" in out
    for path in ("unpooled (Vm.restore)", "pooled (pool.restore_snapshot)", "prepared (after pool.prepare)"):
        row = next(line for line in out.splitlines() if line.startswith(path))
        assert len(re.findall(r"\d[\d.,]* (?:ns|µs|ms|s)\b", row)) == 4, row  # p50/p99 of restore and answer
    assert re.search(r"pool +restores 20, hits \d+, misses \d+, failures 0", out)
    assert re.search(r"prepared +restores 20, failures 0\n +VMs prepared \d+, resets \d+", out)
    assert re.search(r"prepared +8 VMs restored, warmed by call\(b'ping'\) and reset in ", out)


@pytest.mark.kvm
def test_run_demo_counts_every_restore():
    r = demo.run_demo(n=10, memory_mib=16, pool_size=2)
    assert {p: len(v) for p, v in r.restore_ns.items()} == {"unpooled": 10, "pooled": 10, "prepared": 10}
    assert all(a > t > 0 for p in demo.PATHS for t, a in zip(r.restore_ns[p], r.answer_ns[p]))
    s = r.pool_stats
    assert s.restores == 10 and s.hits + s.misses == 10 and s.failures == 0
    assert list(r.summary().index) == list(demo.PATHS)
    p = r.prepared_stats
    assert r.prepared_n == 2 and p.restores == 10 and p.failures == 0 and p.resets >= 10


def test_demo_rejects_a_bad_n():
    with pytest.raises(kvmlab.ConfigError):
        demo.run_demo(n=0)


def _shape(text: str) -> list[str]:
    """Demo output with the figures taken out: what must not change."""
    text = re.sub(r"/\S+", "PATH", text)
    text = re.sub(r"\d[\d.,]*(?: ?(?:ns|µs|ms|s|x|KiB|MiB|B)\b)?", "N", text)
    return [re.sub(r"\s+", " ", line).strip() for line in text.strip().splitlines()]


@pytest.mark.kvm
@pytest.mark.checkout
def test_readme_quickstart_output_matches_the_demo():
    readme = (Path(kvmlab.__file__).resolve().parent.parent / "README.md").read_text()
    sample = re.search(r"```text\n(\$ kvmlab demo\n.*?)```", readme, re.S)
    assert sample, "README.md: the quickstart's demo output sample (```text starting with $ kvmlab demo) is missing"
    root = Path(kvmlab.__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, "-m", "kvmlab", "demo"], capture_output=True, text=True, timeout=60, cwd=root,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _shape(sample.group(1).split("\n", 1)[1]) == _shape(r.stdout)


def test_cpl_probe_image_exits():
    img = cli.cpl_loop_image(5)
    assert img.startswith(b"\xb9\x05\x00\x00\x00") and img.endswith(b"\xef")


def test_usage_errors():
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["nope"])

def test_version_names_kvmlab_the_core_abi_and_zig():
    from importlib import metadata

    from kvmlab import _ffi

    r = subprocess.run([sys.executable, "-m", "kvmlab", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"kvmlab (\S+) \(core ABI (\d+), built with Zig (\d+\.\d+\.\d+)\)\n", r.stdout)
    assert m, r.stdout
    assert m.group(1) == kvmlab.__version__ == metadata.version("kvmlab")
    assert int(m.group(2)) == _ffi.ABI_VERSION
    try:  # the build requires ziglang==X; the core must report that X
        assert m.group(3) == metadata.version("ziglang")
    except metadata.PackageNotFoundError:
        pass
