"""A classic Jupyter notebook server and a headless Chromium driving it (tests/browser only).

``requirements()`` says what is missing; ``notebook_server`` and ``chromium`` are context managers
that always stop what they started (the server with its kernels, the browser with its driver).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("KDLIB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("KDLIB_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = ("apt-get install -y chromium chromium-driver; in a venv: pip install ipywidgets==7.7.1 "
           "widgetsnbextension==3.6.1 notebook==6.5.7 selenium (see .ci/run)")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def requirements() -> list[str]:
    """What this environment lacks for the browser test (empty: all there)."""
    missing = []
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            missing.append(f"{path} (Debian package {package})")
    try:
        import notebook

        if not notebook.__version__.startswith("6."):
            missing.append(f"the classic notebook 6 (notebook {notebook.__version__} is installed): notebook==6.5.7")
    except ImportError:
        missing.append("the classic notebook: notebook==6.5.7")
    try:
        import ipywidgets

        if not ipywidgets.__version__.startswith("7."):
            missing.append(f"ipywidgets 7 (Colab's; {ipywidgets.__version__} is installed): ipywidgets==7.7.1")
    except ImportError:
        missing.append("ipywidgets==7.7.1")
    try:
        import widgetsnbextension

        # the notebook's frontend half: the nbextension in sys.prefix, enabled for the notebook
        ext = Path(sys.prefix, "share", "jupyter", "nbextensions", "jupyter-js-widgets", "extension.js")
        if not ext.is_file():
            missing.append(f"the widget nbextension ({ext}): jupyter nbextension install --py --sys-prefix "
                           "widgetsnbextension && jupyter nbextension enable --py --sys-prefix widgetsnbextension")
        del widgetsnbextension
    except ImportError:
        missing.append("widgetsnbextension==3.6.1")
    for module, name in (("selenium", "selenium"), ("papermill", "papermill"), ("psutil", "psutil")):
        try:
            __import__(module)
        except ImportError:
            missing.append(name)
    return missing


def versions() -> str:
    """The versions in play, one line (for failure messages)."""
    out = [f"python {sys.version.split()[0]} ({sys.executable})"]
    for module in ("notebook", "ipywidgets", "widgetsnbextension", "ipykernel", "jupyter_client", "selenium"):
        try:
            out.append(f"{module} {__import__(module).__version__}")
        except Exception as e:  # noqa: BLE001 - a diagnostic only
            out.append(f"{module}: {type(e).__name__}")
    return ", ".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({path}: {e})"


def _stop_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``proc`` and every process under it (the notebook's kernels): TERM, then KILL."""
    import psutil

    try:
        family = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)


class Server:
    def __init__(self, url: str, token: str, log: Path, proc: subprocess.Popen):
        self.url, self.token, self.log, self.proc = url, token, log, proc

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/notebooks/{name}?token={self.token}"

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)


@contextlib.contextmanager
def notebook_server(notebook_dir: Path, work: Path, timeout: float = 90.0) -> Iterator[Server]:
    """``python -m notebook`` (this interpreter's classic notebook) on a free loopback port.

    Its own Jupyter config, data and runtime folders under ``work`` (no user config leaks in), a
    ``python3`` kernelspec that runs this interpreter, and the checkout on PYTHONPATH.
    """
    port, token = free_port(), os.urandom(12).hex()
    data = work / "jupyter-data"
    spec = data / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    env = dict(os.environ,
               JUPYTER_CONFIG_DIR=str(work / "jupyter-config"), JUPYTER_DATA_DIR=str(data),
               JUPYTER_RUNTIME_DIR=str(work / "jupyter-runtime"), IPYTHONDIR=str(work / "ipython"),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="agg")
    log = work / "notebook-server.log"
    cmd = [sys.executable, "-m", "notebook", "--no-browser", "--allow-root", "--ip=127.0.0.1",
           f"--port={port}", "--NotebookApp.port_retries=0", f"--NotebookApp.token={token}",
           f"--notebook-dir={notebook_dir}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(notebook_dir), start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", token, log, proc)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the notebook server exited ({proc.returncode}) before it answered:\n"
                                     f"$ {' '.join(cmd)}\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"{server.url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the notebook server did not answer within {timeout:.0f} s:\n"
                                     f"{server.log_tail()}")
            time.sleep(0.3)
        yield server
    finally:
        with contextlib.suppress(Exception):  # shuts its kernels down too
            req = urllib.request.Request(f"{server.url}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(req, timeout=5).close()
            proc.wait(timeout=10)
        _stop_tree(proc)


@contextlib.contextmanager
def chromium(work: Path, width: int = 1400, height: int = 2400) -> Iterator["object"]:
    """A headless Chromium (selenium WebDriver) with the browser console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", f"--user-data-dir={work / 'chromium-profile'}",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--disable-domain-reliability",
                # nothing but the loopback server: no lookups or requests to any other host (the
                # notebook's Colab badge, say)
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(work / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_script_timeout(30)
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            with contextlib.suppress(Exception):
                service.stop()


def console_lines(driver, seen: list) -> list:
    """The browser console's entries so far (``seen`` accumulates them: each read empties the log),
    less the resources outside the loopback server that the browser is kept from loading."""
    with contextlib.suppress(Exception):
        seen.extend(e for e in driver.get_log("browser")
                    if not (re.match(r"https?://(?!127\.0\.0\.1[:/])", e.get("message", ""))
                            and "Failed to load resource" in e.get("message", "")))
    return seen


def wait_for(what: str, probe: Callable[[], object], timeout: float, interval: float = 0.5,
             state: Optional[Callable[[], str]] = None):
    """``probe()`` until it is truthy (returned); AssertionError naming ``what`` at the timeout.

    A probe may raise AssertionError to fail at once (an error seen on the page)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\nlast state: {state()}" if state else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)

