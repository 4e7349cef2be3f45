"""Open-in-Colab badges: the GitHub repository the notebooks open from, in one place.

``REPO`` is that one place: ``notebooks/make_notebooks.py`` writes it into each
notebook's badge and install command, and ``rewrite_badges`` (``python -m
kdlib badges --repo OWNER/REPO``) points every badge and install command in
``notebooks/*.ipynb`` and ``README.md`` at another repository, and updates
``REPO`` below to match, so a fork changes one command, not a dozen URLs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Union

from .errors import KdlibError
from .fileio import atomic_write_text

# The GitHub repository (owner/name) the badges open and the notebooks install
# from. A placeholder until the project has a public home: change it with
# `python -m kdlib badges --repo OWNER/REPO`, which rewrites this line too.
REPO = "OWNER/kdlib"

BRANCH = "main"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
_REPO_RE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_PART = r"[A-Za-z0-9_.-]+"
# What rewrite_badges rewrites: the repository part of a badge's target and of a pip install URL.
_BADGE_URL = re.compile(rf"(colab\.research\.google\.com/github/){_PART}/{_PART}(/blob/main/notebooks/)")
_INSTALL_URL = re.compile(rf"(git\+https://github\.com/){_PART}/{_PART}")
_REPO_LINE = re.compile(r'^REPO = "[^"\n]*"$', re.MULTILINE)


def check_repo(repo: str) -> str:
    """``repo`` if it is a GitHub ``owner/name``, else ``KdlibError`` saying what is expected."""
    if not isinstance(repo, str) or not _REPO_RE.fullmatch(repo) or any(p in (".", "..") for p in repo.split("/")):
        raise KdlibError(f"repository {repo!r} is not a GitHub owner/name such as 'alice/kdlib' (letters, "
                         "digits, '.', '_' and '-', one '/'); give it as it appears in github.com/OWNER/REPO")
    return repo


def colab_url(notebook_name: str, repo: str = REPO) -> str:
    """The URL that opens ``notebooks/NAME.ipynb`` of ``repo`` on Colab."""
    name = notebook_name[:-len(".ipynb")] if notebook_name.endswith(".ipynb") else notebook_name
    return f"https://colab.research.google.com/github/{check_repo(repo)}/blob/{BRANCH}/notebooks/{name}.ipynb"


def badge_markdown(notebook_name: str, repo: str = REPO) -> str:
    """The Open-in-Colab badge (Markdown) for ``notebooks/NAME.ipynb`` (``.ipynb`` optional) of ``repo``."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook_name, repo)})"


def install_url(repo: str = REPO) -> str:
    """The pip requirement URL that installs kdlib from ``repo``."""
    return f"git+https://github.com/{check_repo(repo)}"


def rewrite_text(text: str, repo: str) -> str:
    """``text`` with every Colab badge target and kdlib install URL pointing at ``repo``."""
    check_repo(repo)
    text = _BADGE_URL.sub(lambda m: f"{m.group(1)}{repo}{m.group(2)}", text)
    return _INSTALL_URL.sub(lambda m: f"{m.group(1)}{repo}", text)


def rewrite_badges(root: Union[str, Path], repo: str) -> list[Path]:
    """Point the badges and install URLs of ``root``'s notebooks and README at ``repo``.

    Rewrites ``notebooks/*.ipynb`` and ``README.md`` under ``root`` (as text, so
    nothing else in a file moves), and the ``REPO`` line of ``kdlib/badges.py``
    when ``root`` holds it. Only files whose text changes are written, each
    atomically. Returns the changed files (empty when all already point at
    ``repo``); ``KdlibError`` for a malformed ``repo``, before anything is written.
    """
    check_repo(repo)
    root = Path(root)
    if not root.is_dir():
        raise KdlibError(f"{root} is not a folder; give the repository root (the folder holding notebooks/)")
    changed = []
    for path in sorted((root / "notebooks").glob("*.ipynb")) + [root / "README.md"]:
        if path.is_file() and _rewrite(path, lambda text: rewrite_text(text, repo)):
            changed.append(path)
    source = root / "kdlib" / "badges.py"
    if source.is_file() and _rewrite(source, lambda text: _REPO_LINE.sub(f'REPO = "{repo}"', text, count=1)):
        changed.append(source)
    return changed


def _rewrite(path: Path, change) -> bool:
    text = path.read_bytes().decode("utf-8")  # bytes: keep the file's line endings as they are
    new = change(text)
    if new == text:
        return False
    atomic_write_text(path, new)
    return True
