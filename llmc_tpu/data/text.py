"""Read evaluation / calibration text from a local folder or file.

Open sets are read from a folder written by ``datasets``' ``save_to_disk`` (what
``tools/download_*_dataset.py`` produce and llmc-tpu shipped); user data is a ``.txt``
file (one sample a line) or a folder of them.
"""

from __future__ import annotations

from pathlib import Path

OPEN_SETS = ("wikitext2", "c4", "ptb", "pileval")
CUSTOM = ("custom_txt", "custom_ppl")


class DataError(RuntimeError):
    """Data that cannot be used; the message names the file and what to do."""


def read_text(path: Path) -> str:
    """The whole text of a .txt file, or of every .txt in a folder (sorted by name, joined by a newline)."""
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .txt files in this folder")
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{f}: not UTF-8 text (byte {exc.start})") from None
    text = "\n".join(parts)
    if not text.strip():
        raise DataError(f"{path}: no text (empty file)")
    return text


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a .txt file or of every .txt in a folder (sorted by name)."""
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .txt files in this folder")
    lines: list[str] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"{f}: no such file") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{f}: not UTF-8 text (byte {exc.start})") from None
        lines += [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: no text (empty file)")
    return lines


def _load_saved_dataset(path: Path):
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path}: not a dataset folder saved by `datasets` (no dataset_info.json / dataset_dict.json); "
            "create it with tools/download_eval_dataset.py or point to a .txt file with name: custom_ppl"
        ) from None


def _split(ds, preferred: tuple[str, ...]):
    if hasattr(ds, "keys"):
        for name in preferred:
            if name in ds:
                return ds[name]
        return ds[next(iter(ds.keys()))]
    return ds


def default_path(purpose: str, name: str) -> str:
    """Where tools/download_*_dataset.py saves an open set by default."""
    return f"data/LLM/{'cali' if purpose == 'calib' else 'eval'}/{name}"


def resolve_path(purpose: str, name: str, path: str | None) -> Path:
    """The configured path, or the download tool's default folder for an open set; a clear error when missing."""
    key = f"{purpose}.path"
    tool = f"tools/download_{purpose}_dataset.py --dataset_name {name}"
    if path is None:
        if name not in OPEN_SETS:
            raise DataError(f"{key} is not set for {purpose} set {name!r}; give a .txt file or folder")
        path = default_path(purpose, name)
        if not Path(path).exists():
            raise DataError(f"{key} is not set and the default folder {path} does not exist; run `python {tool}` "
                            f"or set {key}")
    p = Path(path).expanduser()
    if not p.exists():
        hint = f"; run `python {tool}`" if name in OPEN_SETS else ""
        raise DataError(f"{key} {str(path)!r}: no such file or folder{hint}")
    return p


def eval_text(name: str, path: str | None) -> str:
    """The evaluation text of a named set, joined as the GPTQ protocol does."""
    p = resolve_path("eval", name, path)
    if name in CUSTOM or p.is_file() or (p.is_dir() and any(p.glob("*.txt"))):
        return read_text(p)  # the text as written: blank lines are part of what the model predicts
    ds = _load_saved_dataset(p)
    if name == "wikitext2":
        return "\n\n".join(_split(ds, ("test",))["text"])
    if name == "c4":
        return " ".join(_split(ds, ("validation",))[:1100]["text"])
    if name == "ptb":
        return " ".join(_split(ds, ("test",))["sentence"])
    raise DataError(f"eval.name {name!r}: allowed: wikitext2, c4, ptb, custom_ppl")
