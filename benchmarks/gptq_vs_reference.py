#!/usr/bin/env python3
"""Our GPTQ vs llm-compressor's GPTQModifier on CPU: same samples, same format, perplexity and wall time.

Rows (W4 asymmetric, group 64, bf16 model, the same calibration token ids for every method):

- ``TPU RTN``: what TPU-MLIR does alone with the float model.
- ``ours``: llmc_tpu's GPTQ; its perplexity is that of the weights the TPU computes with (the
  GPTQ checkpoint's codes, compiled by ``llm_convert.py -q auto`` code for code, see verify).
- ``llm-compressor``: GPTQModifier through ``oneshot`` (sequential pipeline); ``ppl own`` is its
  own quantized weights (compressed-tensors QDQ, its own min/max grid that includes 0);
  ``ppl via TPU RTN`` is what TPU-MLIR makes of those weights handed over as floats (the anchor's
  flow): TPU-MLIR re-grids them.

The two GPTQ pairs: natural column order (ours: groups from the current weights, the GPTQ
paper; llm-compressor: actorder=None, its groups always come from the original weights), and
act-order with static groups (ours: actorder + static_groups; llm-compressor: its default
actorder="static"). Wall time is the quantization call (calibration forward passes included,
evaluation excluded), one run each, same process, same threads.

Runs only in a venv that has llmcompressor (never install it into the project's environment):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install /opt/wheels/torch-2.13.0+cpu-*.whl     # or torch==2.13.0 (CPU build)
    echo "torch==2.13.0+cpu" > /tmp/c.txt && /tmp/refvenv/bin/pip install -c /tmp/c.txt llmcompressor
    /tmp/refvenv/bin/python benchmarks/gptq_vs_reference.py
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from _common import git_commit, package_versions, write_result  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from llmc_tpu.config.load import parse_config  # noqa: E402
from llmc_tpu.data.calib import build_samples, calibration_texts  # noqa: E402
from llmc_tpu.data.text import eval_text  # noqa: E402
from llmc_tpu.engine.blockwise import blocks_of, capture_block_inputs  # noqa: E402
from llmc_tpu.engine.forward import whole_model_logits  # noqa: E402
from llmc_tpu.eval.ppl import perplexity, windows  # noqa: E402
from llmc_tpu.fake_quant import QuantResults, apply_fake_quant, quantize_block  # noqa: E402
from llmc_tpu.models.loading import LoadedModel, load_model  # noqa: E402
from llmc_tpu.pipeline import Quantizer  # noqa: E402
from llmc_tpu.tpu.rtn import TpuWeightFormat  # noqa: E402

CPU = torch.device("cpu")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gptq_vs_reference.json"
PAIRS = [  # (our special, reference actorder)
    ("ours GPTQ, natural order (demo config)", {"actorder": False, "static_groups": False},
     "llm-compressor GPTQ, actorder=None", None),
    ("ours GPTQ, actorder + static_groups", {"actorder": True, "static_groups": True},
     "llm-compressor GPTQ, actorder=static (its default)", "static"),
]


@dataclass
class Row:
    name: str
    kind: str  # float | rtn | ours | reference
    seconds: float | None = None
    ppl_tpu: float | None = None  # the weights the TPU computes with
    ppl_own: float | None = None  # the method's own quantized weights (reference only)
    changed_by_tpu_rtn: float | None = None  # share of weights TPU-MLIR's RTN would change if handed floats
    details: dict[str, Any] = field(default_factory=dict)


def import_reference():
    """llmcompressor's pieces, or a SystemExit that says how to get them."""
    try:
        import llmcompressor  # noqa: F401
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache
    except ImportError as exc:
        raise SystemExit(f"llmcompressor is not importable here ({exc}); run this benchmark in its own venv "
                         "(see the module docstring), never in the project's environment") from None
    if not torch.accelerator.is_available():  # pinning host memory needs an accelerator; on CPU it changes nothing
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    return dict(QuantizationArgs=QuantizationArgs, QuantizationScheme=QuantizationScheme, Dataset=Dataset,
                oneshot=oneshot, GPTQModifier=GPTQModifier)


def run_reference(ref, loaded: LoadedModel, samples: torch.Tensor, fmt: TpuWeightFormat, actorder: str | None,
                  percdamp: float, blocksize: int, batch_size: int) -> tuple[dict[str, torch.Tensor], float, dict[str, Any]]:
    """GPTQModifier via ``oneshot`` on a copy of the model; its quantized weights and wall time."""
    model = copy.deepcopy(loaded.model)
    names = set(model.state_dict())
    ds = ref["Dataset"].from_dict({"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()})
    args = ref["QuantizationArgs"](num_bits=fmt.bits, type="int", symmetric=fmt.symmetric, strategy="group",
                                   group_size=fmt.group_size)
    scheme = ref["QuantizationScheme"](targets=["Linear"], weights=args)
    modifier = ref["GPTQModifier"](config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=blocksize,
                                   dampening_frac=percdamp, actorder=actorder)
    start = time.perf_counter()
    ref["oneshot"](model=model, tokenizer=loaded.tokenizer, dataset=ds, recipe=[modifier],
                   num_calibration_samples=samples.shape[0], max_seq_length=samples.shape[1],
                   shuffle_calibration_samples=False, batch_size=batch_size, pipeline="sequential")
    seconds = time.perf_counter() - start
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}
    details = {"actorder": actorder, "dampening_frac": percdamp, "block_size": blocksize, "batch_size": batch_size,
               "pipeline": "sequential", "grid": "compressed-tensors min/max observer on the original weights (0 included)"}
    del model
    return state, seconds, details


class _FixedSamples(Quantizer):
    """The pipeline's quantize stage, calibrated on token windows built once by the benchmark."""

    def __init__(self, cfg, samples: torch.Tensor, work: Path) -> None:
        from llmc_tpu.resume import Checkpoints

        super().__init__(cfg, progress=False)
        self.samples = samples
        self.device = CPU
        self.ckpt = Checkpoints(work, self.report.config)  # quantize() keeps per-block checkpoints (for --resume)

    def _calibration_inputs(self, loaded: LoadedModel):
        return capture_block_inputs(loaded.model, loaded.spec, [self.samples], store_device=self.device)


def run_ours(loaded: LoadedModel, samples: torch.Tensor, fmt: TpuWeightFormat, special: dict[str, Any],
             percdamp: float, blocksize: int) -> tuple[QuantResults, float, dict[str, Any]]:
    cfg = parse_config({
        "model": {"path": str(loaded.path)},
        "calib": {"name": "custom_txt", "n_samples": samples.shape[0], "seq_len": samples.shape[1], "bs": -1},
        "eval": {"eval_pos": []},
        "quant": {"method": "GPTQ", "weight": {"bit": fmt.bits, "symmetric": fmt.symmetric, "granularity": "per_group",
                                               "group_size": fmt.group_size},
                  "special": {"percdamp": percdamp, "blocksize": blocksize, "true_sequential": True, **special},
                  "quant_out": True},
        "save": {"save_path": "/nonexistent/unused"},
    }, source="benchmark")
    work = LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.spec, loaded.path, loaded.model_type)
    with tempfile.TemporaryDirectory() as tmp:
        quantizer = _FixedSamples(cfg, samples, Path(tmp))
        start = time.perf_counter()
        results = quantizer.quantize(work)
        seconds = time.perf_counter() - start
    errs = [(e, s["err_rtn"][n]) for b in quantizer.report.method["blocks"] for s in b["gptq"] for n, e in s["err"].items()]
    details = {"special": cfg.quant.special, "quant_out": True,
               "mean_rel_output_error": sum(e for e, _ in errs) / len(errs),
               "mean_rel_output_error_rtn": sum(r for _, r in errs) / len(errs)}
    del work
    return results, seconds, details


def tpu_rtn(model: torch.nn.Module, loaded: LoadedModel, fmt: TpuWeightFormat) -> None:
    """What TPU-MLIR computes from this float model: its RTN of the weights as handed over."""
    for i, block in enumerate(blocks_of(model, loaded.spec)):
        apply_fake_quant(model, quantize_block(block, loaded.spec, fmt, f"{loaded.spec.blocks}.{i}"))


def prepared(loaded: LoadedModel, state: dict[str, torch.Tensor] | None, results: QuantResults | None) -> torch.nn.Module:
    """A copy of the model with ``state`` loaded, then ``results`` fake-quantized in."""
    model = copy.deepcopy(loaded.model)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if results is not None:
        apply_fake_quant(model, results)
    return model


def evaluate(loaded: LoadedModel, win: torch.Tensor, bs: int, state: dict[str, torch.Tensor] | None = None,
             results: QuantResults | None = None, rtn_fmt: TpuWeightFormat | None = None) -> float:
    """Perplexity of the prepared model, TPU-MLIR's RTN applied on top when ``rtn_fmt`` is given."""
    model = prepared(loaded, state, results)
    if rtn_fmt is not None:
        tpu_rtn(model, loaded, rtn_fmt)
    model.eval()
    return perplexity(whole_model_logits(model, win, bs, CPU)).ppl


def changed_by_tpu_rtn(loaded: LoadedModel, fmt: TpuWeightFormat, state: dict[str, torch.Tensor] | None = None,
                       results: QuantResults | None = None) -> float:
    """Share of quantized-Linear weights TPU-MLIR's RTN changes when the prepared weights are handed over as floats."""
    model = prepared(loaded, state, results)
    names = [f"{loaded.spec.blocks}.{i}.{n}" for i in range(len(blocks_of(model, loaded.spec))) for n in loaded.spec.linear_names]
    before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    tpu_rtn(model, loaded, fmt)
    changed = sum(int((model.get_submodule(n).weight != w).sum()) for n, w in before.items())
    return changed / sum(w.numel() for w in before.values())


def environment() -> dict[str, Any]:
    versions = package_versions(("torch", "transformers", "llmcompressor", "compressed-tensors"))
    commit = git_commit(ROOT)
    return {"device": f"CPU, {os.cpu_count()} cores", "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "llmc_tpu_commit": commit, "versions": versions}


def table(rows: list[Row], base: float) -> str:
    lines = ["| row | wall time (s) | ppl on the TPU | vs float | ppl own weights | weights TPU RTN would change |",
             "|---|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        ppl_tpu = f"{base:.4f} (no quant)" if r.kind == "float" else fmt(r.ppl_tpu, ".4f")
        delta = "0" if r.kind == "float" else fmt(None if r.ppl_tpu is None else r.ppl_tpu - base, "+.4f")
        changed = fmt(None if r.changed_by_tpu_rtn is None else 100 * r.changed_by_tpu_rtn, ".1f")
        lines.append(f"| {r.name} | {fmt(r.seconds, '.1f')} | {ppl_tpu} | {delta} | {fmt(r.ppl_own, '.4f')} | "
                     f"{changed if changed == '-' else changed + ' %'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: /tmp/refvenv/bin/python benchmarks/gptq_vs_reference.py --out /tmp/g.json")
    ap.add_argument("--model", default=str(ROOT / "data/models/shakespeare-llama"), help="HF Llama-family folder")
    ap.add_argument("--calib", default=str(ROOT / "data/LLM/cali/tinyshakespeare/train.txt"), help="calibration .txt")
    ap.add_argument("--eval", default=str(ROOT / "data/LLM/eval/tinyshakespeare/test.txt"), help="eval .txt")
    ap.add_argument("--n-samples", type=int, default=64, help="calibration windows (default 64, as demo_gptq.yml)")
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--preproc", default="random_truncate_txt")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--eval-bs", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--percdamp", type=float, default=0.01)
    ap.add_argument("--blocksize", type=int, default=128)
    ap.add_argument("--ref-batch-size", type=int, default=16, help="llm-compressor calibration batch size")
    ap.add_argument("--only", choices=["all", "primary"], default="all", help="primary: the natural-order pair only")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results")
    args = ap.parse_args(argv)

    logging.getLogger("llmc_tpu").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    ref = import_reference()
    try:
        from loguru import logger
        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    except ImportError:
        pass

    fmt = TpuWeightFormat(bits=4, group_size=args.group_size, symmetric=False)
    loaded = load_model(args.model)
    texts = calibration_texts("custom_txt", args.calib)
    samples, calib_info = build_samples(texts, loaded.tokenizer, args.preproc, args.n_samples, args.calib_seq_len, args.seed)
    tokens = loaded.tokenizer(eval_text("custom_ppl", args.eval), return_tensors="pt").input_ids[0]
    win = windows(tokens, args.eval_seq_len)
    print(f"model {args.model} ({sum(p.numel() for p in loaded.model.parameters()) / 1e6:.2f}M params, "
          f"{next(loaded.model.parameters()).dtype}); calib {tuple(samples.shape)}; eval {tuple(win.shape)}", flush=True)

    base = evaluate(loaded, win, args.eval_bs)  # also warms up the CPU kernels before anything is timed
    rows = [Row("float (bf16, unquantized)", "float")]
    print(f"  float: ppl {base:.4f}", flush=True)
    ppl = evaluate(loaded, win, args.eval_bs, rtn_fmt=fmt)
    rows.append(Row("TPU RTN (TPU-MLIR alone)", "rtn", 0.0, ppl))
    print(f"  TPU RTN: ppl {ppl:.4f}", flush=True)
    for oname, special, rname, actorder in PAIRS[:1] if args.only == "primary" else PAIRS:
        results, seconds, details = run_ours(loaded, samples, fmt, special, args.percdamp, args.blocksize)
        ppl = evaluate(loaded, win, args.eval_bs, results=results)
        rows.append(Row(oname, "ours", seconds, ppl, None, changed_by_tpu_rtn(loaded, fmt, results=results), details))
        print(f"  {oname}: {seconds:.1f} s, ppl {ppl:.4f}", flush=True)
        state, seconds, details = run_reference(ref, loaded, samples, fmt, actorder, args.percdamp, args.blocksize,
                                                args.ref_batch_size)
        own = evaluate(loaded, win, args.eval_bs, state=state)
        ppl = evaluate(loaded, win, args.eval_bs, state=state, rtn_fmt=fmt)
        rows.append(Row(rname, "reference", seconds, ppl, own, changed_by_tpu_rtn(loaded, fmt, state=state), details))
        print(f"  {rname}: {seconds:.1f} s, ppl own {own:.4f}, via TPU RTN {ppl:.4f}", flush=True)

    text = table(rows, base)
    print()
    print(text)
    env = environment()
    result = {
        "benchmark": "GPTQ: llmc_tpu vs llm-compressor GPTQModifier, W4 asym g64, scored on the weights the TPU computes with",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": env,
        "model": args.model, "format": f"W4 asymmetric, group {args.group_size} (TPU-MLIR W4BF16, chip {fmt.chip})",
        "calibration": {**calib_info, "path": args.calib, "same_ids_fed_to_both": True},
        "eval": {"path": args.eval, "seq_len": args.eval_seq_len, "windows": int(win.shape[0]), "bs": args.eval_bs},
        "columns": {"ppl_tpu": "ours: the GPTQ checkpoint's weights as TPU-MLIR lowers them; reference: TPU-MLIR's RTN "
                               "of its quantized weights handed over as floats",
                    "ppl_own": "the reference's own quantized weights (compressed-tensors QDQ)",
                    "changed_by_tpu_rtn": "share of quantized-Linear weights that TPU-MLIR's RTN changes when the "
                                          "method's quantized weights are handed over as floats",
                    "seconds": "wall time of the quantization call (calibration passes included, eval excluded)"},
        "rows": [{"name": r.name, "kind": r.kind, "seconds": r.seconds, "ppl_tpu": base if r.kind == "float" else r.ppl_tpu,
                  "ppl_own": r.ppl_own, "changed_by_tpu_rtn": r.changed_by_tpu_rtn, "details": r.details} for r in rows],
        "table": text,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
