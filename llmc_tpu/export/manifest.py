"""A checksum manifest of a finished output folder, and its check (``llmc-tpu verify`` runs it first)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"


# sha256 of files as their writer computed it while writing, keyed by path and valid for that size and mtime:
# reading a 7B model's 13 GB back to hash it took most of the 14 s between the last save and the end of a run
_WRITTEN: dict[str, tuple[int, int, str]] = {}


def remember_digest(path: Path, sha256: str) -> None:
    """Record the sha256 a writer computed of the bytes it just wrote to ``path`` (closed)."""
    st = Path(path).stat()
    _WRITTEN[str(Path(path).resolve())] = (st.st_size, st.st_mtime_ns, sha256)


def _sha256(path: Path) -> str:
    st = path.stat()
    known = _WRITTEN.get(str(path.resolve()))
    if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
        return known[2]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Record size and sha256 of every file under ``folder`` (except the manifest itself)."""
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    out = folder / MANIFEST
    out.write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")
    return out


def check_manifest(folder: Path) -> list[str]:
    """Problems found: files missing, changed or added since the run finished (empty when intact)."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return [f"{folder}: no {MANIFEST} (not a finished llmc-tpu run, or written by an older version)"]
    except (json.JSONDecodeError, KeyError):
        return [f"{folder / MANIFEST}: unreadable"]
    problems = []
    for rel, meta in recorded.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            problems.append(f"{rel}: changed since the run finished")
    skip = {MANIFEST}
    work = ("verify/", "bmodel/")  # what verify and the next-step compiles (llm_convert -o, onnx/compile.sh) write
    for p in folder.rglob("*"):
        rel = str(p.relative_to(folder))
        if p.is_file() and rel not in recorded and rel not in skip and not rel.startswith(work):
            problems.append(f"{rel}: not part of the run's output")
    return problems
