"""Shared command line of tools/download_calib_dataset.py and tools/download_eval_dataset.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmc_tpu.data.download import SOURCES, download, names  # noqa: E402
from llmc_tpu.data.text import DataError  # noqa: E402


def main(purpose: str, default_root: str) -> int:
    listing = "\n".join(f"  {n:<10} {SOURCES[n][purpose].path} ({SOURCES[n][purpose].split})" for n in names(purpose))
    parser = argparse.ArgumentParser(
        description=f"Download an open {'calibration' if purpose == 'calib' else 'evaluation'} set once and save it "
                    "where llmc_tpu reads it without network.",
        epilog=f"datasets:\n{listing}\n\nexample:\n  python {sys.argv[0]} --dataset_name wikitext2 --save_path {default_root}\n"
               f"then in the config: {purpose}: {{name: wikitext2, path: {default_root}/wikitext2}}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", required=True, choices=names(purpose))
    parser.add_argument("--save_path", default=default_root, help=f"parent folder (default {default_root}); "
                        "the set is saved in SAVE_PATH/DATASET_NAME")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args()
    import datasets
    import huggingface_hub

    datasets.logging.set_verbosity_error()  # one clear line on failure, not a retry log
    huggingface_hub.utils.logging.set_verbosity_error()
    try:
        out = download(args.dataset_name, purpose, Path(args.save_path) / args.dataset_name, args.overwrite)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"saved {args.dataset_name} to {out}")
    return 0
