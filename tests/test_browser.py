"""A real browser renders 01_quickstart in JupyterLab: the PoolMonitor widget
shows up and a Warm click changes the displayed occupancy; in JupyterLab Dark
the occupancy text stays legible (its computed colours contrast).

Needs Debian's ``chromium`` (+ ``fonts-liberation``) and PyPI ``playwright``
and ``jupyterlab`` (never ``playwright install``: the system Chromium is
used). Skipped with a message when any is missing, unless
``KVMLAB_REQUIRE_BROWSER=1`` (then it fails). Screenshots go to
``$KVMLAB_SCREENSHOT_DIR`` (default: /tmp).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nbhelpers import copy_notebooks, make_jupyter_path

REQUIRE_BROWSER = os.environ.get("KVMLAB_REQUIRE_BROWSER") == "1"
SCREENSHOT_DIR = Path(os.environ.get("KVMLAB_SCREENSHOT_DIR") or "/tmp")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]  # fmt: skip


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return None


def browser_problem() -> str | None:
    missing = []
    if chromium_path() is None:
        missing.append("chromium (apt-get install chromium fonts-liberation)")
    for mod, pkg in (("playwright", "playwright"), ("jupyterlab", "jupyterlab"), ("ipywidgets", "ipywidgets")):
        if importlib.util.find_spec(mod) is None:
            missing.append(f"{pkg} (pip install {pkg})")
    return "browser test needs " + ", ".join(missing) if missing else None


@pytest.fixture(scope="module")
def browser_ready():
    problem = browser_problem()
    if problem:
        if REQUIRE_BROWSER:
            pytest.fail(f"KVMLAB_REQUIRE_BROWSER=1 but {problem}", pytrace=False)
        pytest.skip(problem)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(request, tmp_path, browser_ready):
    """A JupyterLab server on a temp copy of notebooks/; yields (base_url, token).
    Parametrize it indirectly with a theme name ("JupyterLab Dark") to start
    Lab in that theme (settings overrides.json)."""
    nbdir = copy_notebooks(tmp_path)
    settings = tmp_path / "lab-settings"
    settings.mkdir()
    overrides = {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}
    theme = getattr(request, "param", None)
    if theme:
        overrides["@jupyterlab/apputils-extension:themes"] = {"theme": theme}
    (settings / "overrides.json").write_text(json.dumps(overrides))
    port, token = free_port(), "kvmlab-test-token"
    env = dict(os.environ)
    env.update(
        JUPYTER_PATH=str(make_jupyter_path(tmp_path)),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
    )
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
            f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={nbdir}",
            "--expose-app-in-browser", f"--LabApp.app_settings_dir={settings}",
            f"--LabApp.user_settings_dir={tmp_path / 'user-settings'}",
            f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
        ],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=nbdir,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield base, token
    finally:
        proc.send_signal(signal.SIGINT)  # Jupyter asks for confirmation on the first ^C...
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # ...and stops (shutting its kernels down) on the second
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@contextlib.contextmanager
def chromium():
    """Debian's Chromium driven by playwright (headless), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_and_run_quickstart(page, base: str, token: str) -> None:
    """Opens 01_quickstart in Lab, runs every cell and waits until all ran
    and the PoolMonitor shows its occupancy; fails on a traceback."""
    from playwright.sync_api import expect

    page.goto(f"{base}/lab/tree/01_quickstart.ipynb?token={token}", timeout=60_000)
    page.wait_for_function(
        "() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
        " && window.jupyterapp.shell.currentWidget.sessionContext"
        " && window.jupyterapp.shell.currentWidget.sessionContext.session"
        " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel",
        timeout=60_000,
    )
    page.wait_for_function(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.kernelDisplayStatus === 'idle'",
        timeout=60_000,
    )
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    # The monitor renders: its Warm button and its occupancy label.
    expect(page.locator(".widget-button", has_text="Warm")).to_be_visible(timeout=60_000)
    expect(page.locator(".widget-label", has_text="capacity").first).to_be_visible(timeout=30_000)
    # Wait until every cell ran (the last figure is there, no [*] prompt left).
    page.wait_for_function(
        "() => document.querySelectorAll('.jp-OutputArea-output img').length >= 2"
        " && ![...document.querySelectorAll('.jp-InputArea-prompt')].some(p => p.textContent.includes('*'))",
        timeout=90_000,
    )
    errs = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    tracebacks = [t for t in errs.all_inner_texts() if "Traceback" in t or "Error" in t]
    assert not tracebacks, tracebacks


@pytest.mark.kvm
@pytest.mark.slow
def test_quickstart_pool_monitor_in_jupyterlab(lab):
    from playwright.sync_api import expect

    base, token = lab
    shot_full = SCREENSHOT_DIR / "kvmlab-browser-quickstart.png"
    shot_before = SCREENSHOT_DIR / "kvmlab-browser-monitor-before-warm.png"
    shot_after = SCREENSHOT_DIR / "kvmlab-browser-monitor-after-warm.png"
    shot_timings = SCREENSHOT_DIR / "kvmlab-browser-restore-timings.png"
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        open_and_run_quickstart(page, base, token)
        warm = page.locator(".widget-button", has_text="Warm")
        occupancy = page.locator(".widget-label", has_text="capacity").first
        monitor = page.locator(".kvmlab-pool-monitor").first
        monitor.scroll_into_view_if_needed()
        expect(page.locator(".kvmlab-pool-monitor .widget-hprogress").first).to_be_visible()
        expect(page.locator(".kvmlab-pool-monitor .kvmlab-counters")).to_be_visible()
        expect(page.locator(".kvmlab-pool-monitor .kvmlab-last-restore")).to_be_visible(timeout=10_000)
        # The RestoreTimings plot (a PNG inside a widget Output).
        timings = page.locator(".kvmlab-restore-timings").first
        expect(timings.locator("img").first).to_be_visible(timeout=10_000)
        timings.scroll_into_view_if_needed()
        timings.screenshot(path=str(shot_timings))
        monitor.screenshot(path=str(shot_before))

        before = occupancy.inner_text()
        idle_before = int(re.match(r"(\d+) idle / (\d+) capacity", before).group(1))
        capacity = int(re.match(r"(\d+) idle / (\d+) capacity", before).group(2))
        assert idle_before < capacity, f"nothing to warm: {before!r}"
        target = page.locator(".kvmlab-pool-monitor .widget-inline-hbox input[type=number]").first
        assert int(target.input_value()) == capacity
        warm.click()
        expect(occupancy).to_contain_text(f"{capacity} idle / {capacity} capacity", timeout=30_000)
        expect(page.locator(".kvmlab-pool-monitor .widget-html", has_text="warmed to")).to_be_visible(
            timeout=10_000
        )
        monitor.screenshot(path=str(shot_after))
        page.screenshot(path=str(shot_full), full_page=False)
        assert not [e for e in errors if "widget" in e.lower()], errors
    print(f"screenshots: {shot_before} {shot_after} {shot_timings} {shot_full}")


#: Text colour and effective background of an element (the first ancestor
#: with an opaque background), as [r, g, b] lists.
COLORS_JS = """el => {
    const rgb = c => (c.match(/[\\d.]+/g) || []).map(Number);
    let bg = null;
    for (let e = el; e; e = e.parentElement) {
        const c = rgb(getComputedStyle(e).backgroundColor);
        if (c.length >= 3 && (c.length < 4 || c[3] > 0.99)) { bg = c.slice(0, 3); break; }
    }
    return {text: rgb(getComputedStyle(el).color).slice(0, 3), background: bg || [255, 255, 255]};
}"""


def luminance(rgb: list[float]) -> float:
    """WCAG relative luminance of an sRGB colour (0-255 channels)."""

    def lin(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: list[float], b: list[float]) -> float:
    """WCAG contrast ratio (1 .. 21); 4.5 is the minimum for body text."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_contrast_of_known_colours():
    assert contrast([0, 0, 0], [255, 255, 255]) == pytest.approx(21.0)
    assert contrast([118, 118, 118], [255, 255, 255]) == pytest.approx(4.54, abs=0.01)
    assert contrast([85, 85, 85], [17, 17, 17]) < 3  # #555 on a dark background: the old counter labels


@pytest.mark.kvm
@pytest.mark.slow
@pytest.mark.parametrize("lab", ["JupyterLab Dark"], indirect=True)
def test_dark_theme_keeps_the_monitor_legible(lab):
    """In JupyterLab Dark, the occupancy text of the PoolMonitor and of the
    pool's HTML repr, and the counters' labels, contrast with what is behind them."""
    from playwright.sync_api import expect

    base, token = lab
    shot = SCREENSHOT_DIR / "kvmlab-browser-monitor-dark.png"
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        open_and_run_quickstart(page, base, token)
        theme = page.evaluate("() => document.body.dataset.jpThemeName")
        assert theme == "JupyterLab Dark", theme
        page_bg = page.evaluate(COLORS_JS, page.locator(".jp-Notebook").first.element_handle())["background"]
        assert luminance(page_bg) < 0.1, f"the notebook background {page_bg} is not dark: the theme did not apply"
        monitor = page.locator(".kvmlab-pool-monitor").first
        monitor.scroll_into_view_if_needed()
        checked = {
            "monitor occupancy": page.locator(".kvmlab-pool-monitor .widget-label", has_text="capacity").first,
            "counter label": page.locator(".kvmlab-pool-monitor .kvmlab-counters td div").nth(1),
            "repr occupancy": page.locator(".kvmlab-occupancy").first,
        }
        for what, loc in checked.items():
            expect(loc).to_be_visible(timeout=30_000)
            c = page.evaluate(COLORS_JS, loc.element_handle())
            ratio = contrast(c["text"], c["background"])
            assert ratio >= 4.5, f"{what}: text {c['text']} on {c['background']} has contrast {ratio:.2f} < 4.5"
        monitor.screenshot(path=str(shot))
    print(f"screenshot: {shot}")
