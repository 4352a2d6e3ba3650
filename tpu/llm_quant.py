#!/usr/bin/env python3
"""Quantize a model for Sophgo TPUs: ``python tpu/llm_quant.py --config CFG.yml``.

The llmc-tpu entry point, kept for its users (``--config_path`` and ``--llmc_tpu_path``
are accepted too). Same as ``llmc-tpu quantize``; see ``llmc-tpu --help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from llmc_tpu.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] in (["-h"], ["--help"]) or not argv or argv[0].startswith("-"):
        globals_ = [a for a in argv if a in ("-q", "--quiet", "-v", "--verbose")]
        rest = [a for a in argv if a not in globals_]
        sys.exit(main([*globals_, "quantize", *rest]))
    sys.exit(main(argv))
