"""Download an open dataset once with ``datasets`` and save it where a run reads it without network.

The saved folder is ``datasets``' ``save_to_disk`` layout plus ``manifest.json`` (name, purpose,
source, split, rows, text field). It is written to a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmc_tpu.data.text import DataError


@dataclass(frozen=True)
class Source:
    """Where an open set lives on the Hugging Face hub."""

    path: str
    name: str | None
    split: str
    text_field: str
    data_files: str | None = None


# name -> purpose -> source (calibration reads a train split, evaluation a test/validation one)
SOURCES: dict[str, dict[str, Source]] = {
    "pileval": {"calib": Source("mit-han-lab/pile-val-backup", None, "validation", "text")},
    "wikitext2": {"calib": Source("wikitext", "wikitext-2-raw-v1", "train", "text"),
                  "eval": Source("wikitext", "wikitext-2-raw-v1", "test", "text")},
    "c4": {"calib": Source("allenai/c4", None, "train", "text", "en/c4-train.00000-of-01024.json.gz"),
           "eval": Source("allenai/c4", None, "validation", "text", "en/c4-validation.00000-of-00008.json.gz")},
    "ptb": {"calib": Source("ptb_text_only", "penn_treebank", "train", "sentence"),
            "eval": Source("ptb_text_only", "penn_treebank", "test", "sentence")},
    "mme": {"eval": Source("lmms-lab/MME", None, "test", "question")},
}


def names(purpose: str) -> list[str]:
    return [n for n, by_purpose in SOURCES.items() if purpose in by_purpose]


def _hub_load(src: Source):
    from datasets import load_dataset

    kwargs: dict[str, Any] = {"split": src.split}
    if src.data_files:
        kwargs["data_files"] = {src.split: src.data_files}
    return load_dataset(src.path, src.name, **kwargs)


def download(name: str, purpose: str, save_path: str | Path, overwrite: bool = False,
             loader: Callable[[Source], Any] = _hub_load) -> Path:
    """Fetch ``name`` for ``purpose`` ('calib' or 'eval') and save it to ``save_path``."""
    if name not in SOURCES or purpose not in SOURCES[name]:
        raise DataError(f"--dataset_name {name!r}: allowed for {purpose}: {', '.join(names(purpose))}")
    src = SOURCES[name][purpose]
    final = Path(save_path).expanduser().resolve()
    if final.exists() and not overwrite:
        raise DataError(f"--save_path {final} already exists; pass --overwrite to replace it")
    try:
        ds = loader(src)
    except (ConnectionError, OSError, TimeoutError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"could not download {src.path} ({name}): {first}. Is the network reachable? "
                        f"Otherwise copy a saved folder here or use your own .txt data (custom_txt)") from None
    if src.text_field not in ds.column_names:
        raise DataError(f"{src.path} has no column {src.text_field!r} (columns: {', '.join(ds.column_names)})")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        ds.save_to_disk(str(tmp / "data"))
        for f in (tmp / "data").iterdir():
            f.rename(tmp / f.name)
        (tmp / "data").rmdir()
        manifest = {"name": name, "purpose": purpose, "rows": ds.num_rows, "source": asdict(src)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
