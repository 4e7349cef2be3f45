"""kdlib.badges: the Open-in-Colab badges and install URLs follow one repository name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdlib import badges
from kdlib.badges import REF, REPO, badge_markdown, install_url, read_published, rewrite_badges
from kdlib.errors import KdlibError

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("01_data_prep", "02_teacher_cache", "03_train", "04_analysis")


def test_badge_markdown():
    # The badge opens the notebook at the ref its install cell installs: notebook and package agree.
    assert badge_markdown("03_train", "alice/kd", "v1.2") == (
        "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        "(https://colab.research.google.com/github/alice/kd/blob/v1.2/notebooks/03_train.ipynb)")
    assert badge_markdown("03_train.ipynb", "alice/kd") == badge_markdown("03_train", "alice/kd")
    assert f"/github/{REPO}/blob/{REF}/" in badge_markdown("01_data_prep")
    assert install_url("alice/kd", "v1.2") == "git+https://github.com/alice/kd@v1.2"
    assert install_url("alice/kd", None) == "git+https://github.com/alice/kd"


@pytest.fixture
def checkout(tmp_path):
    """A copy of the notebooks, README, docs (a badge added to each) and kdlib/published.json."""
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    for page in (tmp_path / "README.md", tmp_path / "docs" / "protocol.md"):
        text = (ROOT / page.relative_to(tmp_path)).read_text(encoding="utf-8")
        page.write_text(text + "\n" + badge_markdown("03_train") + "\n", encoding="utf-8")
    (tmp_path / "kdlib").mkdir()
    shutil.copy(ROOT / "kdlib" / "published.json", tmp_path / "kdlib" / "published.json")
    return tmp_path


def test_the_published_repo_and_ref_are_read_from_the_package_data():
    assert (REPO, REF) == read_published(ROOT / "kdlib" / "published.json")
    assert json.loads((ROOT / "kdlib" / "published.json").read_text(encoding="utf-8")) == {"repo": REPO, "ref": REF}


def test_rewrite_points_every_badge_and_install_at_the_new_repo(checkout):
    before = {p: p.read_text(encoding="utf-8") for p in checkout.rglob("*") if p.is_file()}
    changed = rewrite_badges(checkout, "alice/kd-fork", "v9.9")
    notebooks = [checkout / "notebooks" / f"{n}.ipynb" for n in NAMES]
    pages = [checkout / "README.md", checkout / "docs" / "protocol.md"]
    assert sorted(changed) == sorted(notebooks + pages + [checkout / "kdlib" / "published.json"])
    for name, path in zip(NAMES, notebooks):
        text = path.read_text(encoding="utf-8")
        assert badge_markdown(name, "alice/kd-fork", "v9.9") in text
        # the install cell's two form fields, JSON-escaped quotes
        assert 'repo = \\"alice/kd-fork\\"  #@param' in text and 'ref = \\"v9.9\\"  #@param' in text
        assert REPO not in text
        # Only the repository and ref changed: same text once they are put back.
        assert text.replace("alice/kd-fork", REPO).replace("v9.9", REF) == before[path]
    for page in pages:
        assert badge_markdown("03_train", "alice/kd-fork", "v9.9") in page.read_text(encoding="utf-8")
    assert read_published(checkout / "kdlib" / "published.json") == ("alice/kd-fork", "v9.9")
    untouched = [p for p in before if p not in changed]
    assert untouched and all(p.read_text(encoding="utf-8") == before[p] for p in untouched)


def test_rewrite_is_idempotent(checkout):
    assert rewrite_badges(checkout, "alice/kd-fork")
    snapshot = {p: p.read_bytes() for p in checkout.rglob("*") if p.is_file()}
    assert rewrite_badges(checkout, "alice/kd-fork") == []
    assert {p: p.read_bytes() for p in checkout.rglob("*") if p.is_file()} == snapshot


def test_rewrite_to_the_current_repo_changes_nothing():
    assert rewrite_badges(ROOT, REPO) == []  # the committed notebooks, README and docs already point there
    assert rewrite_badges(ROOT, REPO, REF) == []


@pytest.mark.parametrize("ref", ["", "v1 2", "a..b", "v1@x", "main:", "x/", "-x", "v1\n", None])
def test_bad_ref_is_refused_before_anything_is_written(checkout, ref):
    snapshot = {p: p.read_bytes() for p in checkout.rglob("*") if p.is_file()}
    with pytest.raises(KdlibError, match="tag, commit or branch"):
        rewrite_badges(checkout, "alice/kd", ref if ref is not None else 3)
    assert {p: p.read_bytes() for p in checkout.rglob("*") if p.is_file()} == snapshot


@pytest.mark.parametrize("repo", ["alice", "alice/kd/extra", "alice/", "/kd", "alice/kd fork", "alice/kd\n",
                                  "https://github.com/alice/kd", "../kd", "alice/..", "", None])
def test_bad_repo_is_refused_before_anything_is_written(checkout, repo):
    snapshot = {p: p.read_bytes() for p in checkout.rglob("*") if p.is_file()}
    with pytest.raises(KdlibError, match="owner/name"):
        rewrite_badges(checkout, repo)
    with pytest.raises(KdlibError, match="owner/name"):
        badges.badge_markdown("03_train", repo)
    assert {p: p.read_bytes() for p in checkout.rglob("*") if p.is_file()} == snapshot


def test_root_that_is_not_a_folder_is_refused(tmp_path):
    with pytest.raises(KdlibError, match="not a folder"):
        rewrite_badges(tmp_path / "missing", "alice/kd")


def test_other_projects_urls_are_left_alone_and_a_second_rewrite_follows_the_first(checkout):
    readme = checkout / "README.md"
    other = ("pip install git+https://github.com/huggingface/transformers@v4.53.0 and "
             "[x](https://colab.research.google.com/github/bob/tool/blob/main/notebooks/demo.ipynb)")
    readme.write_text(readme.read_text(encoding="utf-8") + "\n" + other + "\n", encoding="utf-8")
    rewrite_badges(checkout, "alice/kd-fork", "v1")
    rewrite_badges(checkout, "carol/kd2", "v2")  # the repo named in the checkout's published.json now
    text = readme.read_text(encoding="utf-8")
    assert other in text and badge_markdown("03_train", "carol/kd2", "v2") in text
    assert "alice/kd-fork" not in text
    assert f"github/{REPO}/" not in text and f"github.com/{REPO}" not in text  # prose may name the placeholder


@pytest.mark.parametrize("repo", ["alice/kdlib.git", "-a/kd", "alice/-kd"])
def test_repo_names_github_would_not_have_are_refused(repo):
    with pytest.raises(KdlibError, match="owner/name"):
        badges.check_repo(repo)


@pytest.mark.parametrize("ref", ["a/.hidden", "a.lock/b", ".v1"])
def test_refs_git_would_refuse_are_refused(ref):
    with pytest.raises(KdlibError, match="tag, commit or branch"):
        badges.check_ref(ref)


@pytest.mark.parametrize("text", ['{"repo": "OWNER/kdlib"}', "[1]", "not json", '{"repo": "OWNER/kdlib", "ref": 3}'])
def test_a_damaged_published_json_is_refused_naming_it(checkout, text):
    (checkout / "kdlib" / "published.json").write_text(text, encoding="utf-8")
    snapshot = {p: p.read_bytes() for p in checkout.rglob("*") if p.is_file()}
    with pytest.raises(KdlibError, match="published.json"):
        rewrite_badges(checkout, "alice/kd")
    assert {p: p.read_bytes() for p in checkout.rglob("*") if p.is_file()} == snapshot
