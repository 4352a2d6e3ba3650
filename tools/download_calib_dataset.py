#!/usr/bin/env python3
"""Download a calibration set: python tools/download_calib_dataset.py --dataset_name pileval --save_path data/LLM/cali"""

import sys

from _download_cli import main

if __name__ == "__main__":
    sys.exit(main("calib", "data/LLM/cali"))
