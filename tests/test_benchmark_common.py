"""benchmarks/_common.git_commit names the code of a modified checkout by its git tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import git_commit, worktree_tree  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_a_modified_copy_names_the_tree_of_the_commit_it_is(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("__pycache__/\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    assert git_commit(repo, "pkg") == git(repo, "rev-parse", "--short", "HEAD")  # unmodified: the commit alone

    (repo / "pkg" / "a.py").write_text("x = 2\n")  # the files of a later commit, the .git of the first
    (repo / "pkg" / "b.py").write_text("y = 3\n")
    (repo / "pkg" / "__pycache__").mkdir()
    (repo / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"\0")
    tree = worktree_tree(repo, "pkg")
    named = git_commit(repo, "pkg")
    assert git(repo, "status", "--porcelain", "--", "pkg")  # the checkout's own index is untouched
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "second")
    assert tree == git(repo, "rev-parse", "HEAD:pkg")
    assert named.endswith(f"(pkg/ modified; its tree {tree[:10]})")
