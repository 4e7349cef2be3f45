"""README.md and docs/*.md: every relative link and repository path they name exists, and the README's
test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A path into the repository written in backticks: `kdlib/x.py`, `docs/y.md`, `tests/z.py`, ...
REPO_PATH = re.compile(r"`((?:docs|notebooks|kdlib|tests|benchmarks|figures)/[^`*\s]+\.(?:md|py|ipynb|json|png))`")


def prose(page: Path) -> str:
    """The page without its code blocks (commands name folders that do not exist yet)."""
    return re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)


def headings(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces as '-'."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+\s+(.*)$", prose(page), re.M)}


def test_every_relative_link_and_named_path_resolves():
    broken = []
    for page in PAGES:
        text = prose(page)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and (dest.is_dir() or anchor not in headings(dest))):
                broken.append(f"{page.relative_to(ROOT)}: ({target})")
        broken += [f"{page.relative_to(ROOT)}: `{p}`" for p in REPO_PATH.findall(text) if not (ROOT / p).exists()]
    assert len(PAGES) > 5 and broken == []


def test_the_readme_test_command_is_the_one_ci_runs():
    command = 'pip install -e ".[test]" && python -m pytest'
    assert f"\n{command}\n" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"\n{command}\n" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
