"""What every benchmark here does at the end: write its result as JSON and say where."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_result(result: dict[str, Any], out: str | Path) -> Path:
    """Write ``result`` to ``out`` (parents created) and print the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return out


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each package (None when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for pkg in names:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return versions


def git_commit(root: Path, mark_modified: str | None = None) -> str | None:
    """The checkout's short commit; with ``mark_modified`` a path, noted when that path has uncommitted edits, with
    the git tree id of its working copy: ``git rev-parse COMMIT:PATH`` gives the same id for the commit the copy
    is (a copied checkout whose .git is older than its files still names its code)."""
    import subprocess

    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        if mark_modified and subprocess.run(["git", "-C", str(root), "status", "--porcelain", mark_modified],
                                            capture_output=True, text=True).stdout.strip():
            tree = worktree_tree(root, mark_modified)
            commit += f" ({mark_modified}/ modified" + (f"; its tree {tree[:10]})" if tree else ")")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit


def worktree_tree(root: Path, path: str) -> str | None:
    """The git tree id of ``path`` as it is on disk (ignored files left out), through a scratch index."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "GIT_INDEX_FILE": os.path.join(scratch, "index")}

        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                                  env=env).stdout.strip()

        try:
            git("read-tree", "HEAD")
            git("add", "-A", "--", path)
            return git("write-tree", f"--prefix={path}/")
        except (OSError, subprocess.CalledProcessError):
            return None


def require_cuda():
    """The CUDA device, or exit with a message where there is none (the GPU-only benchmarks)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    return torch.device("cuda")


def median_s(fn, *args, repeats: int) -> float:
    """The median wall time of ``fn(*args)`` over ``repeats`` calls, CUDA synchronized around each call where an
    argument is a CUDA tensor."""
    import time

    import torch

    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
