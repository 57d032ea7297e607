"""Real-browser test of the notebooks: JupyterLab on loopback, driven by headless Debian Chromium via Playwright.

For notebooks 01, 04 and 08 (every notebook with MOE_REF_BROWSER_ALL=1): open it in JupyterLab, Run > Run All
Cells (kernel environment has MOE_REF_SMOKE=1), wait until the kernel is idle, and assert every code cell ran
and none has an error output. In notebook 01, move a widget slider with the keyboard and assert the chart image changed.
Screenshots go to build/browser/. The notebooks are served from a temporary copy of the repository
layout (symlinks to everything but notebooks/), so nothing the browser does can touch the committed files.

Never downloads a browser: it uses /usr/bin/chromium (apt-get install chromium; `make browser-deps`).
Outside CI a missing chromium or playwright skips with the reason; with CI=true it fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = Path(os.environ.get("MOE_REF_NOTEBOOKS_DIR", ROOT / "notebooks"))  # override: develop on scratch copies
ALL_NOTEBOOKS = sorted(p.name for p in NB_DIR.glob("*.ipynb"))
# nbmake runs every notebook's code; the browser adds JupyterLab's front end (widgets, outputs), the same for
# all notebooks: by default it opens the first (the slider check), a middle and the last one, and every
# notebook with MOE_REF_BROWSER_ALL=1
BROWSER_SET = ("01_", "04_", "08_")
NOTEBOOKS = ALL_NOTEBOOKS if os.environ.get("MOE_REF_BROWSER_ALL") == "1" else [
    n for n in ALL_NOTEBOOKS if n.startswith(BROWSER_SET)] or ALL_NOTEBOOKS
SHOTS = ROOT / "build" / "browser"
CHROMIUM = os.environ.get("MOE_REF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SERVER_START_S = 90  # JupyterLab must answer within this
CELL_TIMEOUT_S = float(os.environ.get("MOE_REF_BROWSER_TIMEOUT", "150"))  # one notebook, all cells

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


def _unavailable(reason: str):
    """Fail in CI (the browser test is part of `make test`), skip elsewhere with the reason."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the browser test must run; see `make browser-deps`)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mirror(dst: Path) -> Path:
    """dst/ with symlinks to every top-level entry of the repo except notebooks/, which is copied."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name not in ("notebooks", ".git", ".venv"):
            (dst / entry.name).symlink_to(entry)
    shutil.copytree(NB_DIR, dst / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return dst


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 (random port, token) serving a mirror of the repo; yields its base URL."""
    if not Path(CHROMIUM).exists():
        _unavailable(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    if shutil.which("jupyter", path=str(Path(sys.executable).parent)) is None:
        _unavailable("jupyter not installed in this environment (pip install -e '.[notebooks]')")
    tmp = tmp_path_factory.mktemp("lab")
    root = _mirror(tmp / "root")
    settings = tmp / "settings" / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    notes = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    notes.mkdir(parents=True)
    (notes / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, MOE_REF_SMOKE="1", TRITON_INTERPRET="1",
               JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           f"--LabApp.user_settings_dir={tmp / 'settings'}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly"] + (["--allow-root"] if os.geteuid() == 0 else [])
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()}")
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"jupyter lab did not answer in {SERVER_START_S}s:\n"
                                       f"{(tmp / 'server.log').read_text()}") from None
                time.sleep(0.3)
        yield dict(base=base, token=token, log=tmp / "server.log")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright not installed (pip install -e '.[dev]'; never `playwright install`)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


# JavaScript run in the page: state of the current notebook from JupyterLab's own model
# (window.jupyterapp exists because the server runs with expose_app_in_browser).
_JS_STATE = """() => {
  const app = window.jupyterapp;
  const w = app && app.shell.currentWidget;
  if (!w || !w.content || !w.content.model || !w.sessionContext) return null;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  const cells = [];
  const m = w.content.model.cells;
  for (let i = 0; i < m.length; i++) {
    const c = m.get(i);
    if (c.type !== 'code') continue;
    const outs = [];
    for (let j = 0; j < c.outputs.length; j++) {
      const o = c.outputs.get(j).toJSON();
      outs.push({type: o.output_type, ename: o.ename || null, evalue: o.evalue || null,
                 mimes: Object.keys(o.data || {}),
                 text: o.output_type === 'error' ? (o.traceback || []).join('\\n').slice(-3000) : null});
    }
    cells.push({index: i, count: c.executionCount, state: c.executionState || null,
                empty: c.sharedModel.getSource().trim() === '', outputs: outs});
  }
  return {kernel: kernel ? kernel.status : null, busy: w.sessionContext.isReady === false, cells: cells};
}"""


def _open(page, lab, name: str):
    page.goto(f"{lab['base']}/lab/tree/notebooks/{name}?token={lab['token']}&reset", wait_until="domcontentloaded")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                           "window.jupyterapp.shell.currentWidget.sessionContext && "
                           "window.jupyterapp.shell.currentWidget.sessionContext.session && "
                           "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel && "
                           "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                           timeout=90_000)
    page.locator(".jp-Notebook").first.wait_for(timeout=30_000)


def _run_all(page) -> dict:
    """Run > Run All Cells through the menu bar, then wait until every code cell has finished."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    deadline = time.monotonic() + CELL_TIMEOUT_S
    seen_busy, idle_since, state = False, None, None
    while time.monotonic() < deadline:
        state = page.evaluate(_JS_STATE)
        running = state is None or state["kernel"] != "idle" or any(c["state"] == "running" for c in state["cells"])
        seen_busy |= running
        ran = all(c["count"] is not None or c["empty"] for c in state["cells"]) if state else False
        errored = state is not None and any(o["type"] == "error" for c in state["cells"] for o in c["outputs"])
        if not running and (seen_busy or ran) and (ran or errored):
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 1.0:  # idle and stable (widgets render after the last reply)
                return state
        else:
            idle_since = None
        time.sleep(0.25)
    raise AssertionError(f"cells still running after {CELL_TIMEOUT_S}s: {state}")


def _errors(state: dict) -> list[str]:
    return [f"cell {c['index']}: {o['ename']}: {o['evalue']}\n" + re.sub(r"\x1b\[[0-9;]*m", "", o["text"] or "")
            for c in state["cells"] for o in c["outputs"] if o["type"] == "error"]


def _shutdown_kernels(lab) -> None:
    """Delete every session (and its kernel) so the next notebook starts from a fresh kernel."""
    url = f"{lab['base']}/api/sessions?token={lab['token']}"
    for sess in json.loads(urllib.request.urlopen(url, timeout=10).read()):
        req = urllib.request.Request(f"{lab['base']}/api/sessions/{sess['id']}?token={lab['token']}",
                                     method="DELETE")
        urllib.request.urlopen(req, timeout=30).read()


@pytest.fixture
def page(browser, lab):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    ctx.close()
    _shutdown_kernels(lab)


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=False)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_browser(lab, page, name):
    """Run All Cells in JupyterLab: every code cell ran, no error output; in 01, a slider moves the chart."""
    t0 = time.monotonic()
    _open(page, lab, name)
    state = _run_all(page)
    _shot(page, f"{Path(name).stem}.png")
    (SHOTS / f"{Path(name).stem}.json").write_text(json.dumps(state, indent=1))  # what the browser's model held
    errs = _errors(state)
    assert not errs, f"{name}: error output in the browser:\n" + "\n\n".join(errs)
    code = [c for c in state["cells"] if not c["empty"]]
    assert code, f"{name} has no code cells"
    missing = [c["index"] for c in code if c["count"] is None]
    assert not missing, f"{name}: cells {missing} never ran"
    print(f"{name}: {len(code)} code cells ran in the browser in {time.monotonic() - t0:.1f}s")
    if name.startswith("01"):
        _check_slider_moves_chart(page, name)


if not any(n.startswith("01") for n in NOTEBOOKS):

    def test_notebook01_present():
        """The slider check runs inside notebook 01's browser test; say so when there is no notebook 01."""
        if IN_CI:
            pytest.fail(f"no notebook 01 under {NB_DIR}: the widget slider check cannot run")
        pytest.skip(f"no notebook 01 under {NB_DIR} yet: the widget slider check did not run")


_CHART_SRCS = """() => {
  const s = document.querySelector('.widget-slider');
  if (!s) return null;
  const area = s.closest('.jp-Cell') || document;
  return Array.from(area.querySelectorAll('.jp-OutputArea img')).map(i => i.getAttribute('src') || '');
}"""


def _chart_digests(page) -> list[str] | None:
    """sha256 of each chart image (its data: URL) in the slider's cell."""
    srcs = page.evaluate(_CHART_SRCS)
    return None if srcs is None else [hashlib.sha256(s.encode()).hexdigest()[:16] if s else "" for s in srcs]


def _scroll(locator) -> None:
    """Scroll into view for the screenshots; an output re-rendered meanwhile is retried, then skipped."""
    for _ in range(5):
        try:
            if locator.count():
                locator.scroll_into_view_if_needed(timeout=5_000)
            return
        except Exception:  # playwright Error: element detached while the chart re-rendered
            time.sleep(0.5)


def _show_chart(page) -> None:
    _scroll(page.locator(".jp-Cell:has(.widget-slider) .jp-OutputArea img").last)


def _check_slider_moves_chart(page, name: str) -> None:
    """Move the first widget slider three steps with the keyboard; the chart image in its cell must change."""
    slider = page.locator(".widget-slider").first
    slider.wait_for(state="attached", timeout=30_000)
    _scroll(slider)
    page.wait_for_function("() => { const s = document.querySelector('.widget-slider');"
                           " const a = s && (s.closest('.jp-Cell') || document);"
                           " return a && a.querySelectorAll('.jp-OutputArea img').length > 0; }", timeout=60_000)
    before = _chart_digests(page)
    assert before and all(before), f"{name}: no chart image in the slider's cell: {before}"
    _show_chart(page)
    _shot(page, f"{Path(name).stem}-slider-before.png")
    _scroll(slider)
    label = slider.locator(".widget-readout").first
    value_before = label.inner_text()
    moved = ("(v) => { const r = document.querySelector('.widget-slider .widget-readout');"
             " return r && r.innerText !== v; }")
    for key in ("ArrowRight", "ArrowLeft"):  # a slider already at its maximum moves left instead
        slider.locator(".noUi-handle").first.focus()
        for _ in range(3):
            page.keyboard.press(key)
        try:
            page.wait_for_function(moved, arg=value_before, timeout=5_000)
            break
        except Exception:  # playwright's TimeoutError: try the other direction, then fail below
            continue
    deadline, after = time.monotonic() + 60, before
    while time.monotonic() < deadline:
        after = _chart_digests(page)
        if after and all(after) and after != before:
            break
        time.sleep(0.25)
    time.sleep(0.5)  # let the new image paint before the screenshot
    _show_chart(page)
    _shot(page, f"{Path(name).stem}-slider-after.png")
    value_after = label.inner_text()
    assert value_after != value_before, f"{name}: the slider did not move"
    assert after != before, f"{name}: the chart did not change when the slider went {value_before} -> {value_after}"
    errs = _errors(page.evaluate(_JS_STATE))
    assert not errs, f"{name}: error output after moving the slider:\n" + "\n\n".join(errs)
