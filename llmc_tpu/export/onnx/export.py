"""``save.save_onnx``: the transformed model as ONNX pieces for model_transform.py / model_deploy.py, each checked
against torch with onnxruntime as it is written, plus the ``compile.sh`` that builds the bmodel.

Folder layout (see docs/tpu_mlir.md, "The ONNX path"): ``embedding.onnx``, ``block_{i}.onnx``,
``block_cache_{i}.onnx``, ``lm_head.onnx``, ``greedy_head.onnx``, ``compile.sh``. Every graph is
fp32 with the weights rounded to the hand-off dtype (bf16, or f16 for W*F16), the values the
transformed_model folder holds and that ``rtn.quantize_weight`` predicted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmc_tpu.export.onnx.compile_sh import compile_script
from llmc_tpu.export.onnx.graph import OPSET, OnnxExportError, export_piece, max_rel_error, run_onnx
from llmc_tpu.export.onnx.pieces import (
    AttentionShape,
    CacheBlock,
    DecoderLayout,
    Embedding,
    GreedyHead,
    LmHead,
    PrefillBlock,
    causal_mask,
    decode_mask,
    find_rotary,
    float32_copy,
    rope_tables,
)
from llmc_tpu.models.registry import ModelSpec
from llmc_tpu.tpu.rtn import TpuWeightFormat

TOLERANCE = 1e-3  # onnxruntime vs torch, max relative error, fp32

log = logging.getLogger("llmc_tpu")


def check_exportable(model: nn.Module, spec: ModelSpec, seq_length: int) -> None:
    """Refuse, before any work, a model these pieces would get wrong."""
    if getattr(spec, "vision", ()):
        raise OnnxExportError(f"save.save_onnx exports text-only models; {spec.display_name} is a VLM (vision encoder and "
                              "its position scheme are not exported): use llm_convert.py on transformed_model")
    DecoderLayout.from_spec(spec)
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and seq_length > window:
        raise OnnxExportError(f"the model attends within a sliding window of {window} tokens but the ONNX blocks attend "
                              f"to all run.seq_length {seq_length}: set run.seq_length <= {window}")


@dataclass
class OnnxModel:
    """What the export needs to know about one model: its modules and the deployed shapes."""

    model: nn.Module
    spec: ModelSpec
    seq_length: int
    dtype: torch.dtype  # the hand-off dtype the weights are rounded to
    layout: DecoderLayout = field(init=False)
    shape: AttentionShape = field(init=False)
    cos: torch.Tensor = field(init=False)
    sin: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        check_exportable(self.model, self.spec, self.seq_length)
        self.layout = DecoderLayout.from_spec(self.spec)
        blocks = self.model.get_submodule(self.spec.blocks)
        self.shape = AttentionShape.from_model(self.model.config, blocks[0].get_submodule(self.layout.attn))
        self.cos, self.sin = rope_tables(find_rotary(self.model, self.spec, self.layout), self.seq_length, self.shape.head_dim)

    @property
    def hidden(self) -> int:
        return self.model.config.hidden_size

    def block(self, i: int, cache: bool = False, weights: dict[str, torch.Tensor] | None = None) -> PrefillBlock:
        """Block ``i`` as a float32 piece; ``weights`` (relative Linear name -> [N, K]) replaces Linear weights."""
        blk = float32_copy(self.model.get_submodule(self.spec.blocks)[i], self.dtype)
        for name, w in (weights or {}).items():
            blk.get_submodule(name).weight.data = w.float().clone()
        cls = CacheBlock if cache else PrefillBlock
        return cls(blk, self.layout, self.shape, self.cos, self.sin)

    def block_inputs(self, cache: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
        """Deterministic check inputs for a prefill block, or a decode block at position S/2 with a random history."""
        s, g = self.seq_length, torch.Generator().manual_seed(seed)
        if not cache:
            return {"input_states": torch.randn(1, s, self.hidden, generator=g),
                    "position_ids": torch.arange(s, dtype=torch.int64).view(1, s), "attention_mask": causal_mask(s)}
        position = s // 2
        kv = (1, s, self.shape.kv_heads, self.shape.head_dim)
        return {"input_states": torch.randn(1, 1, self.hidden, generator=g),
                "position_ids": torch.tensor([[position]], dtype=torch.int64), "attention_mask": decode_mask(s, position),
                "history_k": torch.randn(*kv, generator=g), "history_v": torch.randn(*kv, generator=g)}


BLOCK_OUTPUTS = ("hidden_states", "past_k", "past_v")


def _check(path: Path, inputs: dict[str, torch.Tensor], torch_outputs, names) -> dict[str, float]:
    ours = run_onnx(path, inputs)
    outs = torch_outputs if isinstance(torch_outputs, (tuple, list)) else (torch_outputs,)
    return {n: max_rel_error(o, t) for n, o, t in zip(names, ours, outs)}


def _hf_block_error(om: OnnxModel, piece: PrefillBlock, inputs: dict[str, torch.Tensor], onnx_hidden) -> float | str:
    """The ONNX block's hidden_states against the Hugging Face layer's own forward (proves the wrapper)."""
    pos = inputs["position_ids"]
    try:
        with torch.no_grad():
            out = piece.block(inputs["input_states"], attention_mask=inputs["attention_mask"], position_ids=pos,
                              position_embeddings=(om.cos[pos], om.sin[pos]), use_cache=False)
    except Exception as exc:  # a family whose layer takes other arguments: say so, do not fail the export
        return f"not checked ({type(exc).__name__}: {exc})"
    return max_rel_error(onnx_hidden, out[0] if isinstance(out, (tuple, list)) else out)


def export_block(om: OnnxModel, i: int, out_dir: Path, cache: bool) -> dict[str, Any]:
    """Write ``block_{i}.onnx`` or ``block_cache_{i}.onnx`` and check it; returns its report entry."""
    name = f"block_cache_{i}" if cache else f"block_{i}"
    piece = om.block(i, cache)
    inputs = om.block_inputs(cache)
    prefix = f"{om.spec.blocks}.{i}"
    linears = {f"{prefix}.{n}": piece.block.get_submodule(n) for n in om.spec.linear_names}
    path = export_piece(piece, inputs, BLOCK_OUTPUTS, out_dir / f"{name}.onnx", linears)
    with torch.no_grad():
        ref = piece(**inputs)
    errors = _check(path, inputs, ref, BLOCK_OUTPUTS)
    entry: dict[str, Any] = {"max_rel_error": max(errors.values()), "outputs": errors}
    if not cache:
        entry["hf_max_rel_error"] = _hf_block_error(om, piece, inputs, run_onnx(path, inputs)[0])
    return entry


def export_embedding(om: OnnxModel, out_dir: Path) -> dict[str, Any]:
    embed = float32_copy(om.model.get_submodule(om.spec.embeddings[0]), om.dtype)
    piece = Embedding(embed)
    vocab = embed.weight.shape[0]
    ids = torch.randint(0, vocab, (1, om.seq_length), generator=torch.Generator().manual_seed(0))
    path = export_piece(piece, {"input_ids": ids}, ["input_states"], out_dir / "embedding.onnx",
                        dynamic_axes={"input_ids": {1: "seq"}, "input_states": {1: "seq"}})
    with torch.no_grad():
        errors = _check(path, {"input_ids": ids}, piece(ids), ["input_states"])
        errors_one = _check(path, {"input_ids": ids[:, :1]}, piece(ids[:, :1]), ["input_states"])  # embedding_cache shape
    return {"max_rel_error": max(*errors.values(), *errors_one.values()), "outputs": errors}


def export_heads(om: OnnxModel, out_dir: Path) -> dict[str, dict[str, Any]]:
    """``lm_head.onnx`` (final norm included) and ``greedy_head.onnx``."""
    norm = float32_copy(om.model.get_submodule(om.spec.final_norm), om.dtype)
    head = float32_copy(om.model.get_submodule(om.spec.lm_head), om.dtype)
    lm_head = LmHead(norm, head)
    x = torch.randn(1, om.hidden, generator=torch.Generator().manual_seed(0))
    path = export_piece(lm_head, {"hidden_states": x}, ["m_logits"], out_dir / "lm_head.onnx", {om.spec.lm_head: head})
    with torch.no_grad():
        logits = lm_head(x)
    entries = {"lm_head": {"max_rel_error": (e := _check(path, {"hidden_states": x}, logits, ["m_logits"]))["m_logits"],
                           "outputs": e, "quantize": "float (BF16/F16), not weight-quantized, as llm_convert.py"}}
    greedy = GreedyHead()
    path = export_piece(greedy, {"m_logits": logits}, ["token"], out_dir / "greedy_head.onnx")
    token = run_onnx(path, {"m_logits": logits})[0]
    entries["greedy_head"] = {"max_rel_error": 0.0 if int(token.reshape(-1)[0]) == int(greedy(logits).reshape(-1)[0]) else 1.0}
    return entries


def save_onnx(model: nn.Module, spec: ModelSpec, out_dir: Path, fmt: TpuWeightFormat, seq_length: int,
              model_type: str, progress: Callable[..., Iterable[int]] | None = None) -> dict[str, Any]:
    """Write every piece and compile.sh into ``out_dir``; return the report entry (max relative errors per piece).

    Raises OnnxExportError when onnxruntime disagrees with torch by more than TOLERANCE.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    om = OnnxModel(model, spec, seq_length, fmt.handoff_dtype)
    num_layers = len(model.get_submodule(spec.blocks))
    pieces: dict[str, dict[str, Any]] = {"embedding": export_embedding(om, out_dir)}
    layers = range(num_layers) if progress is None else progress(range(num_layers), desc="onnx blocks", unit="block")
    for i in layers:
        pieces[f"block_{i}"] = export_block(om, i, out_dir, cache=False)
        pieces[f"block_cache_{i}"] = export_block(om, i, out_dir, cache=True)
    pieces.update(export_heads(om, out_dir))
    script = out_dir / "compile.sh"
    script.write_text(compile_script(model_type, num_layers, fmt, seq_length), encoding="utf-8")
    script.chmod(0o755 & ~_umask())
    worst = max(pieces.items(), key=lambda kv: kv[1]["max_rel_error"])
    hf = [e["hf_max_rel_error"] for e in pieces.values() if isinstance(e.get("hf_max_rel_error"), float)]
    report = {"folder": str(out_dir), "seq_length": seq_length, "opset": OPSET, "check": "onnxruntime vs torch, fp32",
              "max_rel_error": worst[1]["max_rel_error"], "worst_piece": worst[0],
              "hf_block_max_rel_error": max(hf) if hf else None, "compile": "compile.sh", "pieces": pieces}
    bad = {n: e["max_rel_error"] for n, e in pieces.items() if e["max_rel_error"] > TOLERANCE}
    bad |= {n: e["hf_max_rel_error"] for n, e in pieces.items()
            if isinstance(e.get("hf_max_rel_error"), float) and e["hf_max_rel_error"] > TOLERANCE}
    if bad:
        raise OnnxExportError(f"ONNX pieces differ from torch by more than {TOLERANCE} (max relative error): {bad}")
    log.info("onnx: %d pieces in %s, max relative error vs torch %.2e (%s)", len(pieces), out_dir, worst[1]["max_rel_error"], worst[0])
    return report


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
