"""The viewer in a real JupyterLab: start it on 127.0.0.1 with a token, open a notebook that calls
``slice_viewer`` (the same call as seg2d's 03/04), run it in the browser, and move the slice slider."""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import nbformat
import numpy as np
from chromium import drain, wait_for
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from nbsupport.paths import project_root

NOTEBOOK = """import numpy as np
from nbsupport.viz import slice_viewer

z, y, x = np.mgrid[0:24, 0:64, 0:80]
ct = np.where(((y - 32) / 28) ** 2 + ((x - 40) / 36) ** 2 < 1, 40.0, -1000.0) + 300.0 * (z % 6 == 0)
lesion = (z - 12) ** 2 + (y - 30) ** 2 + (x - 30) ** 2 < 64
viewer = slice_viewer(ct, {"ground_truth": lesion, "prediction": np.roll(lesion, 3, axis=2)}, modality="CT",
                      spacing=(2.5, 0.7, 0.7), attention=np.random.default_rng(0).random((6, 8, 10)),
                      text="Findings: a nodule; synthetic volume for the JupyterLab test.")
viewer"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_lab(root: Path, port: int, token: str, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("NBSUPPORT_HEADLESS", "MPLBACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(project_root()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JUPYTER_CONFIG_DIR"] = str(root / ".jupyter")  # no user settings leak in
    env["JUPYTERLAB_SETTINGS_DIR"] = str(root / ".jupyter" / "lab-settings")
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(root / ".jupyter" / "workspaces")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           "--ServerApp.port_retries=0"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI runs as root
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _ready(port: int, token: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_viewer_slider_renders_and_responds_in_jupyterlab(browser, tmp_path, screenshot_dir):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "nbsupport", "display_name": "Python (nbsupport)", "language": "python"},
                   "language_info": {"name": "python"}}
    nb.cells = [nbformat.v4.new_code_cell(NOTEBOOK)]
    nbformat.write(nb, tmp_path / "viewer.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp_path / "jupyterlab.log"
    lab = _start_lab(tmp_path, port, token, log)
    try:
        wait_for(lambda: _ready(port, token) or lab.poll() is not None, timeout_s=60, what="JupyterLab to listen")
        assert lab.poll() is None, f"JupyterLab exited:\n{log.read_text()[-3000:]}"
        drain(browser)
        browser.get(f"http://127.0.0.1:{port}/lab/tree/viewer.ipynb?token={token}")
        wait_for(lambda: browser.execute_script(
            "const app = window.jupyterapp; if (!app) return false;"
            "const w = app.shell.currentWidget; return !!(w && w.sessionContext && w.sessionContext.session"
            " && w.sessionContext.session.kernel && w.sessionContext.session.kernel.status === 'idle');"),
            timeout_s=90, what="the notebook's kernel to start")
        browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        image = wait_for(lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, ".jupyter-widgets img")
                                  if (e.get_attribute("src") or "").startswith("blob:")],
                         timeout_s=90, what="the viewer's image")[0]
        slider = next(s for s in browser.find_elements(By.CSS_SELECTOR, ".widget-slider")
                      if s.find_element(By.CSS_SELECTOR, ".widget-label").text == "slice")
        readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout")
        start = int(readout.text)
        z, y, x = np.mgrid[0:24, 0:64, 0:80]
        area = (((z - 12) ** 2 + (y - 30) ** 2 + (x - 30) ** 2) < 64).sum(axis=(1, 2))
        assert start == int(np.argmax(area)), "the viewer opens at the slice with the most mask area"
        panel = browser.find_element(By.CSS_SELECTOR, ".jupyter-widgets.widget-html")
        assert f"slice {start + 1} / 24" in panel.text and "Findings: a nodule" in panel.text
        browser.save_screenshot(str(screenshot_dir / "jupyterlab_viewer.png"))
        before = image.get_attribute("src")
        handle = slider.find_element(By.CSS_SELECTOR, ".noUi-handle")
        handle.click()
        handle.send_keys(Keys.ARROW_RIGHT)
        wait_for(lambda: readout.text == str(start + 1), timeout_s=10, what="the slider to move")
        wait_for(lambda: image.get_attribute("src") != before, timeout_s=30,
                 what="the kernel to send the new slice's image")
        wait_for(lambda: f"slice {start + 2} / 24" in panel.text, timeout_s=10,
                 what="the text panel to follow the slider")
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=15)
        except subprocess.TimeoutExpired:
            lab.kill()
