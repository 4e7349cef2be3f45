"""The notebooks' install cell, run as Colab runs it: a placeholder repository stops it with a message
(no pip, no git); a set repository installs kdlib alone at the pinned ref, and a re-run picks up a new ref.

GitHub is a local repository here: git's ``url.<base>.insteadOf`` (in a private gitconfig) sends
``https://github.com/alice/kdlib`` to it, so the cell's own ``git ls-remote`` and ``pip install
git+https://...`` run unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
from helpers import fake_github, git

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("01_data_prep", "02_teacher_cache", "03_train", "04_analysis")


def install_cell(name: str = "03_train") -> str:
    nb = nbformat.read(str(ROOT / "notebooks" / f"{name}.ipynb"), as_version=4)
    return nb.cells[1].source


# Runs cells the way a Colab kernel does: google.colab imported, and no kdlib but the one the cell installs
# (this checkout's editable install is hidden, as it is not on a Colab runtime).
HARNESS = textwrap.dedent("""\
    import json, sys, types
    google = types.ModuleType("google"); google.__path__ = []
    colab = types.ModuleType("google.colab"); google.colab = colab
    sys.modules.update({"google": google, "google.colab": colab})
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                        and "editable" not in getattr(f, "__name__", "")]
    sys.path[:] = [p for p in sys.path if p != %(root)r]
    for source in json.load(open(sys.argv[1])):
        exec(compile(source, "<install cell>", "exec"), {"__name__": "__main__"})
        import kdlib
        from importlib import metadata
        url = json.loads(metadata.distribution("kdlib").read_text("direct_url.json") or "{}")
        print("INSTALLED", url.get("url"), url.get("vcs_info", {}).get("commit_id"))
        print("FILE", kdlib.__file__, "MARKER", getattr(kdlib, "MARKER", None), flush=True)
    """)


def run_cells(python: str, cells: list[str], tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    script, sources = tmp_path / "harness.py", tmp_path / "cells.json"
    script.write_text(HARNESS % {"root": str(ROOT)})
    sources.write_text(json.dumps(cells))
    return subprocess.run([python, str(script), str(sources)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)


def cells_output(stdout: str) -> list[str]:
    """The harness's output cut per cell (each ends with its FILE line)."""
    chunks, current = [], []
    for line in stdout.splitlines():
        current.append(line)
        if line.startswith("FILE "):
            chunks.append("\n".join(current))
            current = []
    return chunks


def with_fields(source: str, repo: str, ref: str) -> str:
    """The cell as a user leaves it after typing into its two form fields."""
    lines = [f'repo = "{repo}"  #@param {{type:"string"}}' if line.startswith("repo = ") else
             f'ref = "{ref}"  #@param {{type:"string"}}' if line.startswith("ref = ") else line
             for line in source.splitlines()]
    # The notebook's own modules (kdlib.colab, kdlib.notebook, ...) need torch, which is not here.
    return "\n".join("import kdlib" if line.startswith("import kdlib.") else line for line in lines)


@pytest.mark.parametrize("name", NAMES)
def test_placeholder_repository_stops_with_what_to_do_before_git_or_pip(name, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("git", "pip"):  # any call of either is recorded
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} >> {tmp_path}/called\n")
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    source = install_cell(name)
    assert 'repo = "OWNER/kdlib"' in source  # the committed notebooks carry the placeholder
    done = run_cells(sys.executable, [source], tmp_path, env)
    assert done.returncode != 0
    err = done.stderr
    assert "kdlib's GitHub repository is not set" in err and "repo field" in err
    assert "python -m kdlib badges --repo" in err and "Publishing your copy" in err
    assert "Traceback" not in err  # SystemExit: the message alone
    assert not (tmp_path / "called").exists()


def test_set_repository_installs_the_pinned_ref_alone_and_a_rerun_picks_up_a_new_one(tmp_path):
    # "GitHub": alice/kdlib, this checkout's files (as committed or not), tagged v-a, then v-b.
    gitconfig = fake_github(tmp_path)
    remote = tmp_path / "github" / "alice" / "kdlib"
    init = remote / "kdlib" / "__init__.py"
    init.write_text(init.read_text() + '\nMARKER = "b"\n')
    git("commit", "-q", "-am", "b", cwd=remote)
    git("tag", "v-b", cwd=remote)
    commit = {t: subprocess.run(["git", "rev-parse", f"{t}^{{commit}}"], cwd=remote, capture_output=True,
                                text=True).stdout.strip() for t in ("v-a", "v-b")}
    # The runtime: this Python's packages (torch, transformers, ...), with kdlib's own venv on top.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    env = {**os.environ, "GIT_CONFIG_GLOBAL": str(gitconfig), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    source = install_cell()
    site = next((tmp_path / "venv" / "lib").glob("python3*/site-packages"))
    before = {p.name.split("-")[0] for p in site.glob("*.dist-info")}  # the venv's own pip

    # One session: install v-a, run again (nothing to do), then switch to v-b in the same kernel.
    done = run_cells(python, [with_fields(source, "alice/kdlib", "v-a"), with_fields(source, "alice/kdlib", "v-a"),
                              with_fields(source, "alice/kdlib", "v-b")], tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    first, again, switched = cells_output(done.stdout)
    assert f"installed kdlib from alice/kdlib@v-a ({commit['v-a'][:10]})" in first
    assert f"FILE {tmp_path / 'venv'}" in first and "MARKER None" in first
    assert f"kdlib from alice/kdlib@v-a ({commit['v-a'][:10]}) is installed" in again  # not reinstalled
    assert "installed kdlib from" not in again
    assert f"installed kdlib from alice/kdlib@v-b ({commit['v-b'][:10]})" in switched
    assert "MARKER b" in switched  # the new code, in the same kernel
    assert f"INSTALLED https://github.com/alice/kdlib {commit['v-b']}" in switched
    # kdlib alone: no other package was installed into the runtime.
    assert {p.name.split("-")[0] for p in site.glob("*.dist-info")} - before == {"kdlib"}

    # A branch that moved is picked up too; a ref that does not exist is refused with a message.
    git("commit", "-q", "--allow-empty", "-m", "c", cwd=remote)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=remote, capture_output=True, text=True).stdout.strip()
    done = run_cells(python, [with_fields(source, "alice/kdlib", "main")], tmp_path, env)
    assert done.returncode == 0 and f"alice/kdlib@main ({head[:10]})" in done.stdout, done.stderr[-2000:]
    done = run_cells(python, [with_fields(source, "alice/kdlib", "v-nope")], tmp_path, env)
    assert done.returncode != 0 and "has no tag or branch 'v-nope'" in done.stderr
    done = run_cells(python, [with_fields(source, "alice/nothere", "v-a")], tmp_path, env)
    assert done.returncode != 0 and "https://github.com/alice/nothere cannot be read" in done.stderr


def test_the_ref_is_matched_exactly_and_pasted_fields_are_cleaned(tmp_path):
    # Names that end the same way: ls-remote matches old/v3 and release/v1 too; the cell must not.
    gitconfig = fake_github(tmp_path)
    remote = tmp_path / "github" / "alice" / "kdlib"
    init = remote / "kdlib" / "__init__.py"
    commits = {}
    for marker in ("a", "b", "c"):
        if marker != "a":
            init.write_text(init.read_text() + f'\nMARKER = "{marker}"\n')
            git("commit", "-q", "-am", marker, cwd=remote)
        commits[marker] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=remote, capture_output=True,
                                         text=True).stdout.strip()
    git("tag", "v1", commits["a"], cwd=remote)  # lightweight, as README's `git tag`
    git("branch", "release/v1", commits["b"], cwd=remote)
    git("tag", "-a", "old/v3", "-m", "x", commits["b"], cwd=remote)
    git("tag", "-a", "v3", "-m", "x", commits["c"], cwd=remote)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    env = {**os.environ, "GIT_CONFIG_GLOBAL": str(gitconfig), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    source = install_cell()
    done = run_cells(python, [with_fields(source, "alice/kdlib", "v3"), with_fields(source, "alice/kdlib", "v1 "),
                              with_fields(source, " https://github.com/alice/kdlib.git", commits["b"][:8].upper())],
                     tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    v3, v1, short = cells_output(done.stdout)
    assert f"INSTALLED https://github.com/alice/kdlib {commits['c']}" in v3 and "MARKER c" in v3
    assert f"INSTALLED https://github.com/alice/kdlib {commits['a']}" in v1 and "@v1 (" in v1
    assert f"INSTALLED https://github.com/alice/kdlib {commits['b']}" in short
    # The same short hash again: recognised as installed (case does not matter).
    done = run_cells(python, [with_fields(source, "alice/kdlib", commits["b"][:8].upper())], tmp_path, env)
    assert "is installed" in done.stdout and "installed kdlib from" not in done.stdout
    # A hex ref that is no commit: pip fails, and the cell says so in one message.
    done = run_cells(python, [with_fields(source, "alice/kdlib", "cafe1234")], tmp_path, env)
    assert done.returncode != 0 and "pip could not install https://github.com/alice/kdlib at cafe1234" in done.stderr
    assert "CalledProcessError" not in done.stderr
