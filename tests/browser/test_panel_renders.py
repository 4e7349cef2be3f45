"""notebooks/03_train.ipynb's training panel, rendered by a real browser under Colab's ipywidgets.

The notebook, parametrized for the smoke preset (papermill, prepare only), runs in the classic
Jupyter notebook (notebook 6.5.7, widgetsnbextension 3.6.1: the closest stand-in for Colab's
frontend) in headless Chromium. The test asserts what a person would see: the panel's dropdowns,
its Train button and experiment label, no widget error; a dropdown changed in the page reaches the
kernel; pressing Train trains and the panel's plot appears; the last cell's plot is there.

Not part of the default ``python -m pytest`` (tests/conftest.py ignores this folder): run it as
``python -m pytest tests/browser`` in an environment with ipywidgets 7.7.1, widgetsnbextension
3.6.1, notebook 6.5.7, selenium and Debian's chromium + chromium-driver (.ci/run builds one).
It fails, not skips, when any of them is missing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from jupyter_browser import (ROOT, INSTALL, chromium, console_lines, notebook_server, requirements, strip_ansi,
                             versions, wait_for)

NOTEBOOK = ROOT / "notebooks" / "03_train.ipynb"
CELLS_TIMEOUT = 300.0  # Run all: imports, the plan, 4 smoke steps, their evaluations (~5 s on 2 cores)
TRAIN_TIMEOUT = 180.0  # the panel's Train: 4 smoke steps of another experiment (~1.5 s)
WIDGET_ERRORS = ("Error displaying widget", "Error rendering Jupyter widget", "Failed to display",
                 "model not found", "Could not create", "Loading widget")

# The code cells' state as the page has it: prompt numbers ('*' = queued/running), errors.
CELLS_JS = """
return Jupyter.notebook.get_cells().map(function (c, i) {
  if (c.cell_type !== 'code') return null;
  var outs = c.output_area.outputs;
  return {index: i, prompt: c.input_prompt_number === undefined ? null : c.input_prompt_number,
          source: c.get_text().split('\\n')[0].slice(0, 70),
          errors: outs.filter(function (o) { return o.output_type === 'error'; })
                      .map(function (o) { return o.ename + ': ' + o.evalue + '\\n' + o.traceback.join('\\n'); })};
}).filter(function (c) { return c !== null; });
"""

# The output areas (widget views included) whose text contains one of arguments[0].
ERROR_TEXTS_JS = """
var needles = arguments[0].map(function (n) { return n.toLowerCase(); });
return Array.from(document.querySelectorAll('.output_area')).map(function (e) { return e.innerText; })
  .filter(function (t) { return needles.some(function (n) { return t.toLowerCase().indexOf(n) >= 0; }); });
"""

KERNEL_VERSIONS_JS = """
var done = arguments[arguments.length - 1], out = '';
Jupyter.notebook.kernel.execute(
  'import sys, ipywidgets, kdlib; print(sys.executable, "ipywidgets", ipywidgets.__version__, "kdlib from", kdlib.__file__)',
  {iopub: {output: function (m) { out += (m.content.text || JSON.stringify(m.content)); }},
   shell: {reply: function () { setTimeout(function () { done(out); }, 300); }}},
  {silent: false, store_history: false});
"""


def prepared_notebook(folder: Path, **params) -> tuple[Path, list]:
    """notebooks/03_train.ipynb with ``params`` injected (papermill, not run); its cells."""
    import nbformat
    import papermill

    declared = papermill.inspect_notebook(str(NOTEBOOK))
    assert set(params) <= set(declared), f"03_train.ipynb does not declare {sorted(set(params) - set(declared))}"
    out = folder / NOTEBOOK.name
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=params, prepare_only=True,
                               kernel_name="python3", progress_bar=False)
    return out, nbformat.read(str(out), as_version=4).cells


def cell_index(cells, needle: str) -> int:
    found = [i for i, c in enumerate(cells) if c.cell_type == "code" and needle in c.source]
    assert len(found) == 1, f"expected one code cell with {needle!r} in 03_train.ipynb, found {len(found)}"
    return found[0]


def test_panel_renders_and_trains_in_the_classic_notebook(data_dir, tmp_path):
    missing = requirements()  # a failure, not a skip: CI must not pass without the browser
    if missing:
        pytest.fail("the browser test needs: " + "; ".join(missing) + f".\nInstall: {INSTALL}\n({versions()})",
                    pytrace=False)
    work = tmp_path / "work"
    nbdir = tmp_path / "nb"
    work.mkdir()
    nbdir.mkdir()
    results = tmp_path / "runs"
    path, cells = prepared_notebook(nbdir, preset="smoke", feature_map="none", feature="hidden", divergence="kl",
                                    cosine=False, seed=0, results_dir=str(results), data_dir=str(data_dir),
                                    max_steps=4)
    panel_cell = cell_index(cells, "kdlib.ui.panel(")
    last_cell = len(cells) - 1
    assert "show_val_ppl" in cells[last_cell].source

    console: list = []
    notes: list[str] = []  # what the test saw, for the failure message
    with notebook_server(nbdir, work) as server, chromium(work) as driver:
        def state() -> str:
            try:
                return json.dumps(driver.execute_script(CELLS_JS))[:3000]
            except Exception as e:  # noqa: BLE001 - a diagnostic only
                return f"(page state unavailable: {type(e).__name__}: {e})"

        def cell(i: int):
            return driver.execute_script("return Jupyter.notebook.get_cell(arguments[0]).element[0];", i)

        try:
            run_the_notebook(driver, server, path.name, panel_cell, last_cell, cell, state, notes)
            driver.save_screenshot(str(work / "passed.png"))
            print("\n".join(notes))  # shown with -rP / -s
        except BaseException as e:  # AssertionError, selenium's errors, pytest.fail: say what the page showed
            shot = work / "failure.png"
            try:
                driver.save_screenshot(str(shot))
            except Exception:  # noqa: BLE001
                shot = None
            errors = [f"  [{c.get('level')}] {c.get('message')}" for c in console_lines(driver, console)
                      if c.get("level") in ("SEVERE", "WARNING")]
            try:
                widget_text = driver.execute_script(
                    "var e = Jupyter.notebook.get_cell(arguments[0]).element[0].querySelector('.output');"
                    "return e ? e.innerText : '(no output area)';", panel_cell)
            except Exception as err:  # noqa: BLE001
                widget_text = f"({type(err).__name__})"
            kind = "" if isinstance(e, AssertionError) else f"{type(e).__name__}: "
            raise AssertionError(
                f"{kind}{strip_ansi(str(e))}\n\n"
                f"--- what the test saw\n" + "\n".join(notes) + "\n"
                f"--- the panel cell's output as shown\n{widget_text[:2000]}\n"
                f"--- browser console errors and warnings ({len(errors)})\n" + "\n".join(errors[-40:]) + "\n"
                f"--- cells\n{strip_ansi(state())}\n"
                f"--- notebook server log (last lines)\n{server.log_tail(30)}\n"
                f"--- versions: {versions()}\n"
                f"--- screenshot: {shot}") from None


def run_the_notebook(driver, server, name, panel_cell, last_cell, cell, state, notes):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(server.notebook_url(name))
    wait_for("the notebook page, its kernel and the widget manager (the widgetsnbextension) to load",
             lambda: driver.execute_script(
                 "return !!(window.Jupyter && Jupyter.notebook && Jupyter.notebook._fully_loaded &&"
                 " Jupyter.notebook.kernel && Jupyter.notebook.kernel.is_connected() &&"
                 " Jupyter.notebook.kernel.widget_manager);"),
             timeout=90, state=lambda: driver.execute_script(
                 "return window.Jupyter && Jupyter.notebook ? {loaded: Jupyter.notebook._fully_loaded,"
                 " kernel: !!Jupyter.notebook.kernel, connected: !!(Jupyter.notebook.kernel &&"
                 " Jupyter.notebook.kernel.is_connected()), widget_manager: !!(Jupyter.notebook.kernel &&"
                 " Jupyter.notebook.kernel.widget_manager)} : 'no Jupyter on the page';"))
    notes.append("kernel: " + strip_ansi(driver.execute_async_script(KERNEL_VERSIONS_JS)).strip())
    assert "ipywidgets 7." in notes[-1], f"the kernel does not run Colab's ipywidgets 7: {notes[-1]}"

    driver.execute_script("Jupyter.notebook.execute_all_cells();")
    start = time.monotonic()

    def all_cells_ran():
        cells = driver.execute_script(CELLS_JS)
        for c in cells:
            if c["errors"]:
                raise AssertionError(f"cell {c['index']} ({c['source']!r}) raised:\n" + strip_ansi(c["errors"][0]))
        return all(isinstance(c["prompt"], int) for c in cells) and driver.execute_script(
            "return !!document.querySelector('#kernel_indicator_icon.kernel_idle_icon');")

    wait_for("every cell to run (Run all) and the kernel to go idle", all_cells_ran, CELLS_TIMEOUT, state=state)
    notes.append(f"Run all: {time.monotonic() - start:.1f} s")

    # the panel as shown
    panel = cell(panel_cell)
    wait_for("the panel's widgets (a .widget-vbox) in its cell's output",
             lambda: panel.find_elements(By.CSS_SELECTOR, ".widget-vbox"), 20)
    shown = driver.execute_script(ERROR_TEXTS_JS, list(WIDGET_ERRORS))
    assert not shown, f"an output area shows a widget error: {shown[0][:500]!r}"
    selects = panel.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")
    notes.append(f"dropdowns: {len(selects)}")
    assert len(selects) >= 5, f"expected the panel's 5 dropdowns, found {len(selects)} select elements"
    buttons = [b for b in panel.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == "Train"]
    assert len(buttons) == 1 and buttons[0].is_displayed(), "the panel's Train button is not shown"
    train = buttons[0]
    assert train.is_enabled(), "the Train button is disabled"

    def label_with(needle):
        return lambda: [e for e in panel.find_elements(By.CSS_SELECTOR, ".widget-label") if needle in e.text]

    wait_for("the experiment label 'experiment: kl (...'", label_with("experiment: kl ("), 20)

    # a choice made in the page reaches the kernel: the label is the kernel's answer
    divergence = next((s for s in selects if "js" in [o.get_attribute("value") or o.text for o in
                                                      Select(s).options]), None)
    assert divergence is not None, "no divergence dropdown offering 'js'"
    Select(divergence).select_by_visible_text("js")
    wait_for("the experiment label to follow the divergence dropdown to 'js'",
             label_with("experiment: js ("), 30)

    # Train: a fresh run (js-seed0); the plot appears once its first evaluation lands
    start = time.monotonic()
    train.click()

    def plot_shown():
        imgs = panel.find_elements(By.CSS_SELECTOR, "img.widget-image, .widget-image img")
        return [i for i in imgs if i.is_displayed() and
                driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth;", i)]

    def trained():
        labels = [e.text for e in panel.find_elements(By.CSS_SELECTOR, ".widget-label")]
        failed = [t for t in labels if "stopped with an error" in t or "plot failed" in t]
        assert not failed, f"the panel's status says {failed}; its output: {panel.text[-1500:]!r}"
        return any("js-seed0: done" in t for t in labels)

    wait_for("the panel's training to finish (status 'js-seed0: done')", trained, TRAIN_TIMEOUT,
             state=lambda: repr([e.text for e in panel.find_elements(By.CSS_SELECTOR, ".widget-label")]))
    # the plot is drawn before the status says done: a few seconds for the page to show it
    wait_for("the panel's plot (img.widget-image shown, naturalWidth > 0) after its training finished",
             plot_shown, 20)
    notes.append(f"panel Train: {time.monotonic() - start:.1f} s")
    img = plot_shown()[0]
    width = driver.execute_script("return arguments[0].naturalWidth;", img)
    assert width >= 100, f"the panel's plot is {width} px wide"
    assert (img.get_attribute("src") or "").startswith(("data:image/png", "blob:")), img.get_attribute("src")[:80]
    # the training log reached the panel's Output widget (printed by train_run in the button's callback)
    logged = "\n".join(e.text for e in panel.find_elements(
        By.CSS_SELECTOR, ".jupyter-widgets-output-area, .widget-output"))  # ipywidgets 7, 8
    notes.append(f"panel Output: {logged[:200]!r}")
    assert "js-seed0" in logged, f"the panel's Output widget shows no training log: {panel.text[-1500:]!r}"

    # the last cell: the validation-perplexity plot of the Run-all training
    last = cell(last_cell)
    imgs = [i for i in last.find_elements(By.CSS_SELECTOR, ".output_area img")
            if i.is_displayed() and driver.execute_script("return arguments[0].naturalWidth;", i)]
    assert imgs, "the last cell (show_val_ppl) shows no image"
