"""A real browser renders 01_quickstart in JupyterLab: the PoolMonitor widget
shows up and a Warm click changes the displayed occupancy.

Needs Debian's ``chromium`` (+ ``fonts-liberation``) and PyPI ``playwright``
and ``jupyterlab`` (never ``playwright install``: the system Chromium is
used). Skipped with a message when any is missing, unless
``KVMLAB_REQUIRE_BROWSER=1`` (then it fails). Screenshots go to
``$KVMLAB_SCREENSHOT_DIR`` (default: /tmp).
"""

from __future__ import annotations

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
def lab(tmp_path, browser_ready):
    """A JupyterLab server on a temp copy of notebooks/; yields (base_url, token)."""
    nbdir = copy_notebooks(tmp_path)
    settings = tmp_path / "lab-settings"
    settings.mkdir()
    (settings / "overrides.json").write_text(
        json.dumps({"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}})
    )
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


@pytest.mark.kvm
@pytest.mark.slow
def test_quickstart_pool_monitor_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    base, token = lab
    shot_full = SCREENSHOT_DIR / "kvmlab-browser-quickstart.png"
    shot_before = SCREENSHOT_DIR / "kvmlab-browser-monitor-before-warm.png"
    shot_after = SCREENSHOT_DIR / "kvmlab-browser-monitor-after-warm.png"
    shot_timings = SCREENSHOT_DIR / "kvmlab-browser-restore-timings.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
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
            warm = page.locator(".widget-button", has_text="Warm")
            expect(warm).to_be_visible(timeout=60_000)
            occupancy = page.locator(".widget-label", has_text="capacity").first
            expect(occupancy).to_be_visible(timeout=30_000)
            # Wait until every cell ran (the last figure is there, no [*] prompt left).
            page.wait_for_function(
                "() => document.querySelectorAll('.jp-OutputArea-output img').length >= 2"
                " && ![...document.querySelectorAll('.jp-InputArea-prompt')].some(p => p.textContent.includes('*'))",
                timeout=90_000,
            )
            errs = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            tracebacks = [t for t in errs.all_inner_texts() if "Traceback" in t or "Error" in t]
            assert not tracebacks, tracebacks
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
        finally:
            browser.close()
    print(f"screenshots: {shot_before} {shot_after} {shot_timings} {shot_full}")
