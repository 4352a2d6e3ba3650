"""The TPU-MLIR commands that compile the ONNX pieces (``compile.sh``), one model_transform + model_deploy per piece.

Only the decoder blocks are weight-quantized (``--quantize W4BF16 ...``), as ``llm_convert.py``
does: embedding and lm_head are compiled in BF16 (F16 for W*F16), so the Linears llmc-tpu
quantized and predicted are exactly the ones the chip gets in integers. ``verify --onnx`` runs
the same argument lists (``piece_commands``) on block_0.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from llmc_tpu.tpu.rtn import TpuWeightFormat

HERE = "$HERE"  # compile.sh's own folder (where the .onnx files are); a real path when verify runs the commands


@dataclass(frozen=True)
class PieceCommands:
    """model_transform.py and model_deploy.py arguments (argv, tool first) for one piece."""

    name: str
    transform: list[str]
    deploy: list[str]


def deploy_quantize(fmt: TpuWeightFormat) -> list[str]:
    """``--quantize W4BF16 --q_group_size 64 [--q_symmetric]`` for the decoder blocks."""
    args = ["--quantize", fmt.llm_convert_quantize.upper(), "--q_group_size", str(fmt.group_size)]
    return args + ["--q_symmetric"] if fmt.symmetric else args


def _float_quantize(fmt: TpuWeightFormat) -> str:
    return "BF16" if fmt.scale_dtype == "bfloat16" else "F16"


def piece_commands(piece: str, fmt: TpuWeightFormat, seq_length: int, onnx_dir: str = HERE) -> PieceCommands:
    """The commands for ``embedding``, ``embedding_cache``, ``lm_head``, ``greedy_head``, ``block_{i}`` or ``block_cache_{i}``."""
    onnx = "embedding" if piece.startswith("embedding") else piece
    transform = ["model_transform.py", "--model_name", piece, "--model_def", f"{onnx_dir}/{onnx}.onnx"]
    if piece == "embedding":
        transform += ["--input_shapes", f"[[1,{seq_length}]]"]
    elif piece == "embedding_cache":
        transform += ["--input_shapes", "[[1,1]]"]
    transform += ["--mlir", f"{piece}.mlir"]
    deploy = ["model_deploy.py", "--mlir", f"{piece}.mlir"]
    if piece.startswith("block_"):
        deploy += [*deploy_quantize(fmt), "--quant_input", "--quant_output", "--disable_layer_group"]
        if piece.startswith("block_cache_"):
            deploy += ["--addr_mode", "io_alone"]
    elif piece.startswith("embedding"):
        deploy += ["--quantize", _float_quantize(fmt), "--quant_input", "--quant_output"]
    elif piece == "lm_head":
        deploy += ["--quantize", _float_quantize(fmt), "--quant_input"]  # logits stay f32 for the greedy head
    elif piece != "greedy_head":  # greedy_head: F32, TPU-MLIR's default
        raise ValueError(f"unknown piece {piece!r}")
    deploy += ["--chip", fmt.chip, "--model", f"{piece}.bmodel"]
    return PieceCommands(piece, transform, deploy)


def piece_names(num_layers: int) -> list[str]:
    """Every piece compile.sh builds, in the order it builds them."""
    names = ["embedding", "embedding_cache", "lm_head", "greedy_head"]
    for i in range(num_layers):
        names += [f"block_{i}", f"block_cache_{i}"]
    return names


def bmodel_name(model_type: str, fmt: TpuWeightFormat, seq_length: int) -> str:
    granularity = "pc" if fmt.per_channel else f"g{fmt.group_size}"
    return f"{model_type}_{fmt.llm_convert_quantize}_{granularity}{'_sym' if fmt.symmetric else ''}_seq{seq_length}_{fmt.chip}.bmodel"


def _shell(argv: list[str]) -> str:
    return " ".join(f'"{a}"' if a.startswith(HERE) else shlex.quote(a) for a in argv)


def compile_script(model_type: str, num_layers: int, fmt: TpuWeightFormat, seq_length: int) -> str:
    """The text of compile.sh: every piece, then ``model_tool --combine`` into one bmodel."""
    fmt_name = (f"{fmt.llm_convert_quantize.upper()} {'per channel' if fmt.per_channel else f'g{fmt.group_size}'}"
                f"{' symmetric' if fmt.symmetric else ''}")
    lines = [
        "#!/usr/bin/env bash",
        "# Written by llmc-tpu: compile these ONNX pieces with TPU-MLIR 1.30.2 into one bmodel.",
        "#   PATH=$HOME/.cache/llmc_tpu/tpu-mlir-1.30.2/venv/bin:$PATH bash compile.sh [WORK_DIR]   (default ../bmodel/onnx)",
        f"# Decoder blocks: {fmt_name} on {fmt.chip}, sequence length {seq_length}. Embedding and lm_head stay",
        f"# {_float_quantize(fmt)} (as llm_convert.py does): llmc-tpu's prediction covers exactly the block Linears.",
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        'WORK="${1:-$(dirname "$HERE")/bmodel/onnx}"  # SAVE_PATH/bmodel is not part of the run (manifest.json)',
        'mkdir -p "$WORK" && cd "$WORK"',
        "for tool in model_transform.py model_deploy.py model_tool; do",
        '  command -v "$tool" >/dev/null || { echo "$tool not found: put TPU-MLIR\'s venv/bin first on PATH" >&2; exit 127; }',
        "done",
    ]
    bmodels = []
    for piece in piece_names(num_layers):
        cmds = piece_commands(piece, fmt, seq_length)
        lines += ["", f"# {piece}", _shell(cmds.transform), _shell(cmds.deploy)]
        bmodels.append(f"{piece}.bmodel")
    out = bmodel_name(model_type, fmt, seq_length)
    lines += ["", "# one bmodel with every net", _shell(["model_tool", "--combine", *bmodels, "-o", out]),
              f'echo "written: $WORK/{out}"', ""]
    return "\n".join(lines)
