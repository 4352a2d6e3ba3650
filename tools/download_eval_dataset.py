#!/usr/bin/env python3
"""Download an evaluation set: python tools/download_eval_dataset.py --dataset_name wikitext2 --save_path data/LLM/eval"""

import sys

from _download_cli import main

if __name__ == "__main__":
    sys.exit(main("eval", "data/LLM/eval"))
