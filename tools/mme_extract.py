#!/usr/bin/env python3
"""Turn an MME dataset folder (``datasets`` save_to_disk of lmms-lab/MME) into samples.json + images.

    python tools/download_eval_dataset.py --dataset_name mme --save_path data/VLM/eval/raw
    python tools/mme_extract.py --dataset data/VLM/eval/raw/mme --save_path data/VLM/eval/MME

Then ``eval: {name: mme, path: data/VLM/eval/MME}``. Each row keeps ``category`` and ``question_id``;
an image shared by the two questions about it is written once. ``--per_category N`` keeps the first
N images of each category (both of their questions), for a quick check.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

COLUMNS = ("question_id", "image", "question", "answer", "category")


class ExtractError(RuntimeError):
    """The dataset folder cannot be turned into samples.json; the message says why."""


def _split(ds):
    if hasattr(ds, "keys"):
        return ds["test"] if "test" in ds else ds[next(iter(ds.keys()))]
    return ds


def _file_name(question_id: str, category: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", question_id or category).strip("._") or "image"
    return stem if stem.lower().endswith((".png", ".jpg", ".jpeg")) else stem + ".png"


def extract(dataset: Path, save_path: Path, per_category: int | None = None) -> dict[str, int]:
    """Write ``save_path/samples.json`` and ``save_path/images/``; returns counts for the summary."""
    from datasets import load_from_disk

    try:
        ds = _split(load_from_disk(str(dataset)))
    except FileNotFoundError:
        raise ExtractError(f"{dataset}: not a dataset folder saved by `datasets` (run tools/download_eval_dataset.py "
                           "--dataset_name mme first)") from None
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise ExtractError(f"{dataset}: columns {missing} missing (found {ds.column_names}); is this lmms-lab/MME?")
    images_dir = save_path / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows, written, seen_per_cat = [], {}, defaultdict(set)
    for row in ds:
        category, qid = str(row["category"]), str(row["question_id"])
        key = (category, qid)
        if per_category is not None and key not in seen_per_cat[category] and len(seen_per_cat[category]) >= per_category:
            continue
        seen_per_cat[category].add(key)
        if key not in written:
            name = f"{category}/{_file_name(qid, category)}" if category else _file_name(qid, category)
            (images_dir / name).parent.mkdir(parents=True, exist_ok=True)
            row["image"].convert("RGB").save(images_dir / name)
            written[key] = f"images/{name}"
        rows.append({"image": written[key], "question": row["question"], "answer": str(row["answer"]).strip(),
                     "category": category, "question_id": qid})
    if not rows:
        raise ExtractError(f"{dataset}: no rows")
    (save_path / "samples.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"questions": len(rows), "images": len(written), "categories": len(seen_per_cat)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="the MME folder written by datasets' save_to_disk")
    parser.add_argument("--save_path", required=True, help="output folder (samples.json + images/)")
    parser.add_argument("--per_category", type=int, default=None, help="keep the first N images of each category")
    args = parser.parse_args(argv)
    try:
        counts = extract(Path(args.dataset), Path(args.save_path), args.per_category)
    except ExtractError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.save_path}/samples.json: {counts['questions']} questions, {counts['images']} images, "
          f"{counts['categories']} categories")
    return 0


if __name__ == "__main__":
    sys.exit(main())
