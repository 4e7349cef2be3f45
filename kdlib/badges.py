"""Open-in-Colab badges and the notebooks' install: the GitHub repository and ref, in one place.

That place is ``kdlib/published.json`` (data, read here into ``REPO`` and ``REF``):
``notebooks/make_notebooks.py`` writes them into each notebook's badge (which opens
the notebook at ``REF``) and into its install cell (which installs kdlib at ``REF``,
so the notebook and the package it calls are the same version). ``rewrite_badges``
(``python -m kdlib badges --repo OWNER/REPO [--ref REF]``) points every badge,
install cell and install URL in ``notebooks/*.ipynb``, ``README.md`` and
``docs/*.md`` at another repository and ref, and rewrites ``published.json`` to
match: a fork changes one command, not a dozen URLs (docs/colab.md, "Publishing
your copy").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

from .errors import KdlibError
from .fileio import atomic_write_text

# The GitHub repository (owner/name) the badges open and the notebooks install from, and the ref (a
# tag, commit or branch) they pin. The repository is a placeholder until the project has a public
# home: the install cell refuses it with a message saying what to do.
PUBLISHED = Path(__file__).with_name("published.json")
PLACEHOLDER_OWNER = "OWNER"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
_REPO_RE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
# A git ref as a URL path part and a pip URL's @REF: no spaces, quotes, '..', '@', '#', '\', '?' or ':'.
_REF_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./+-]*$")
_REFPART = r"[A-Za-z0-9_./+-]+?"
# What rewrite_badges rewrites: a badge's target and a pip install URL of the current repository (no
# other project's), the install cell's two fields (in a notebook's JSON their quotes are escaped: \"),
# and published.json.
_CELL_REPO = re.compile(r'(\brepo = \\?")[^"\\\n]*(\\?"  #@param)')
_CELL_REF = re.compile(r'(\bref = \\?")[^"\\\n]*(\\?"  #@param)')


def check_repo(repo: str) -> str:
    """``repo`` if it is a GitHub ``owner/name``, else ``KdlibError`` saying what is expected."""
    if (not isinstance(repo, str) or not _REPO_RE.fullmatch(repo) or repo.endswith(".git")
            or any(p in (".", "..") or p.startswith("-") for p in repo.split("/"))):
        raise KdlibError(f"repository {repo!r} is not a GitHub owner/name such as 'alice/kdlib' (letters, "
                         "digits, '.', '_' and '-', one '/'); give it as it appears in github.com/OWNER/REPO")
    return repo


def check_ref(ref: str) -> str:
    """``ref`` if it is a plausible git tag, commit or branch name, else ``KdlibError``."""
    if (not isinstance(ref, str) or not _REF_RE.fullmatch(ref) or ".." in ref or ref.endswith((".", "/"))
            or "//" in ref or any(p.startswith(".") or p.endswith(".lock") for p in ref.split("/"))):
        raise KdlibError(f"ref {ref!r} is not a git tag, commit or branch such as 'v0.1.0', 'main' or a commit "
                         "hash (letters, digits and . _ - + /, no spaces)")
    return ref


def is_placeholder(repo: str) -> bool:
    """True while ``repo`` is the unpublished placeholder (``OWNER/...``)."""
    return repo.split("/", 1)[0] == PLACEHOLDER_OWNER


def read_published(path: Union[str, Path] = PUBLISHED) -> tuple[str, str]:
    """(repo, ref) from a ``published.json``: ``{"repo": "owner/name", "ref": "TAG"}``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        repo, ref = data["repo"], data["ref"]
    except (ValueError, TypeError, KeyError) as e:
        raise KdlibError(f'{path} is not a published.json of kdlib ({{"repo": "owner/name", "ref": "TAG"}}: '
                         f"{e!r}); restore it (git checkout -- {path}) or write its two fields by hand") from None
    try:
        return check_repo(repo), check_ref(ref)
    except KdlibError as e:
        raise KdlibError(f"{path}: {e}") from None


def published_text(repo: str, ref: str) -> str:
    """The text of a ``published.json`` naming ``repo`` and ``ref``."""
    return json.dumps({"repo": check_repo(repo), "ref": check_ref(ref)}, indent=2) + "\n"


# Change both with `python -m kdlib badges --repo OWNER/REPO --ref TAG`, which rewrites published.json.
REPO, REF = read_published()


def colab_url(notebook_name: str, repo: str = REPO, ref: str = REF) -> str:
    """The URL that opens ``notebooks/NAME.ipynb`` of ``repo`` at ``ref`` on Colab."""
    name = notebook_name[:-len(".ipynb")] if notebook_name.endswith(".ipynb") else notebook_name
    return (f"https://colab.research.google.com/github/{check_repo(repo)}/blob/{check_ref(ref)}"
            f"/notebooks/{name}.ipynb")


def badge_markdown(notebook_name: str, repo: str = REPO, ref: str = REF) -> str:
    """The Open-in-Colab badge (Markdown) for ``notebooks/NAME.ipynb`` (``.ipynb`` optional) of ``repo``."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook_name, repo, ref)})"


def install_url(repo: str = REPO, ref: Optional[str] = REF) -> str:
    """The pip requirement URL that installs kdlib from ``repo`` at ``ref`` (None: the default branch)."""
    return f"git+https://github.com/{check_repo(repo)}" + (f"@{check_ref(ref)}" if ref else "")


def rewrite_text(text: str, repo: str, ref: str = REF, old: str = REPO) -> str:
    """``text`` with every Colab badge and install URL of repository ``old`` (other projects' stay),
    and the install cell's two fields, pointing at ``repo``/``ref``."""
    check_repo(repo), check_ref(ref), check_repo(old)
    badge = re.compile(rf"(colab\.research\.google\.com/github/){re.escape(old)}/blob/{_REFPART}(/notebooks/)")
    install = re.compile(rf"(git\+https://github\.com/){re.escape(old)}(?:@[A-Za-z0-9_./+-]+)?(?![A-Za-z0-9_.-])")
    text = badge.sub(lambda m: f"{m.group(1)}{repo}/blob/{ref}{m.group(2)}", text)
    text = install.sub(lambda m: f"{m.group(1)}{repo}@{ref}", text)
    text = _CELL_REPO.sub(lambda m: f"{m.group(1)}{repo}{m.group(2)}", text)
    return _CELL_REF.sub(lambda m: f"{m.group(1)}{ref}{m.group(2)}", text)


def rewrite_badges(root: Union[str, Path], repo: str, ref: Optional[str] = None) -> list[Path]:
    """Point the badges, install cells and install URLs of ``root``'s notebooks and docs at ``repo``.

    ``ref`` (a tag, commit or branch; None = keep ``REF``) is what the badges open and the install
    cells install. Rewrites ``notebooks/*.ipynb``, ``README.md`` and ``docs/*.md`` under ``root``
    (as text, so nothing else in a file moves), and ``kdlib/published.json`` when ``root`` holds it.
    Only files whose text changes are written, each atomically. Returns the changed files (empty
    when all already point there); ``KdlibError`` for a malformed ``repo`` or ``ref``, before
    anything is written.
    """
    check_repo(repo)
    ref = check_ref(REF if ref is None else ref)
    root = Path(root)
    if not root.is_dir():
        raise KdlibError(f"{root} is not a folder; give the repository root (the folder holding notebooks/)")
    published = root / "kdlib" / PUBLISHED.name
    # The repository the files point at now: the checkout's own published.json (this package's otherwise).
    old = read_published(published)[0] if published.is_file() else REPO
    changed = []
    texts = [*sorted((root / "notebooks").glob("*.ipynb")), root / "README.md", *sorted((root / "docs").glob("*.md"))]
    for path in texts:
        if path.is_file() and _rewrite(path, lambda text: rewrite_text(text, repo, ref, old)):
            changed.append(path)
    if published.is_file() and read_published(published) != (repo, ref):
        atomic_write_text(published, published_text(repo, ref))
        changed.append(published)
    return changed


def _rewrite(path: Path, change) -> bool:
    text = path.read_bytes().decode("utf-8")  # bytes: keep the file's line endings as they are
    new = change(text)
    if new == text:
        return False
    atomic_write_text(path, new)
    return True
