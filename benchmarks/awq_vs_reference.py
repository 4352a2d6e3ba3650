#!/usr/bin/env python3
"""Our AWQ vs llm-compressor's AWQModifier on CPU: same samples, same format, same scoring.

Every row is a float model; each is then fake-quantized twice and evaluated the same way
(``llmc_tpu.eval.ppl``, non-overlapping windows over the eval text):

- ``ppl TPU RTN``: ``llmc_tpu.tpu.rtn.fake_quantize`` of the bf16 weights, i.e. what TPU-MLIR
  computes from that float model (the number that matters for a Sophgo TPU);
- ``ppl ref RTN``: compressed-tensors' own fake quant (min/max observer, the reference's
  scale and zero point; for the reference row the qparams it stored itself).

Calibration samples are built once with ``llmc_tpu.data.calib.build_samples`` and the very
same token ids go to both methods. Wall time is the quantization call alone (calibration
forward passes included, evaluation excluded).

Runs only in a venv that has llmcompressor (never install it into the project's env):

    /tmp/refvenv/bin/python benchmarks/awq_vs_reference.py
    /tmp/refvenv/bin/python benchmarks/awq_vs_reference.py --model path/to/hf_llama \\
        --calib calib.txt --eval test.txt --n-samples 128 --calib-seq-len 512 --out /tmp/r.json

See benchmarks/README.md for the venv recipe and the last recorded results.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # llm-compressor draws a progress bar per grid point

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from _common import git_commit, package_versions, write_result  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from llmc_tpu.config.load import parse_config, tpu_format  # noqa: E402
from llmc_tpu.data.calib import build_samples, calibration_texts  # noqa: E402
from llmc_tpu.data.text import eval_text  # noqa: E402
from llmc_tpu.engine.blockwise import blocks_of, capture_block_inputs  # noqa: E402
from llmc_tpu.engine.forward import whole_model_logits  # noqa: E402
from llmc_tpu.eval.ppl import perplexity, windows  # noqa: E402
from llmc_tpu.fake_quant import apply_fake_quant, quantize_block  # noqa: E402
from llmc_tpu.models.loading import LoadedModel, load_model  # noqa: E402
from llmc_tpu.pipeline import Quantizer  # noqa: E402
from llmc_tpu.tpu.rtn import TpuWeightFormat  # noqa: E402

CPU = torch.device("cpu")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "awq_vs_reference.json"

# Our AWQ variants: the demo config (v2 scales + symmetric clip, like llmc's template);
# v1 scales (x^r / w^(1-r)) without clip, the closest match to AWQModifier's default
# duo_scaling=True, which has no clip search; v1 with clip (AutoAWQ's recipe).
OURS = {
    "ours AWQ v2 + clip (demo config)": {"trans_version": "v2", "weight_clip": True, "clip_sym": True},
    "ours AWQ v1, no clip": {"trans_version": "v1", "weight_clip": False},
    "ours AWQ v1 + clip": {"trans_version": "v1", "weight_clip": True, "clip_sym": True},
}
# AWQModifier variants: its default (duo_scaling=True, ~ our v1) and duo_scaling=False (~ our v2).
REFERENCE = {
    "llm-compressor AWQ duo_scaling=True (default)": {"duo_scaling": True},
    "llm-compressor AWQ duo_scaling=False": {"duo_scaling": False},
}


@dataclass
class Row:
    name: str
    kind: str  # float | rtn | ours | reference
    seconds: float | None = None
    cpu_seconds: float | None = None
    ppl_tpu: float | None = None
    ppl_ref: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Stopwatch:
    """Wall and CPU seconds (CPU time of this process: steadier than wall time on a shared machine)."""

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


# -- the reference: llm-compressor ------------------------------------------------------------
def import_reference():
    """llmcompressor's pieces, or a SystemExit that says how to get them (never into the project env)."""
    try:
        import compressed_tensors
        import llmcompressor
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from llmcompressor.observers.base import Observer
        from llmcompressor.pipelines.cache import IntermediatesCache
    except ImportError as exc:
        raise SystemExit(f"llmcompressor is not importable here ({exc}). Run this benchmark in its own venv; "
                         "see benchmarks/README.md (never install it into the project's environment).") from None
    if not torch.accelerator.is_available():
        # llmcompressor 0.14 pins the cached batches before AWQ's grid search
        # (IntermediatesCache.pin_memory), which raises "Cannot access accelerator device when
        # none is available" on a CPU-only torch. Pinning only speeds up host-to-device copies;
        # on the CPU there is no copy, so skipping it changes no number.
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    return dict(compressed_tensors=compressed_tensors, llmcompressor=llmcompressor, QuantizationArgs=QuantizationArgs,
                QuantizationScheme=QuantizationScheme, fake_quantize=fake_quantize, oneshot=oneshot,
                QuantizationModifier=QuantizationModifier, AWQModifier=AWQModifier, Observer=Observer)


def reference_args(ref, fmt: TpuWeightFormat):
    """compressed-tensors' description of the same weight format (W4 asymmetric, per group)."""
    strategy = "channel" if fmt.per_channel else "group"
    return ref["QuantizationArgs"](num_bits=fmt.bits, type="int", symmetric=fmt.symmetric, strategy=strategy,
                                   group_size=None if fmt.per_channel else fmt.group_size)


def run_reference(ref, loaded: LoadedModel, samples: torch.Tensor, fmt: TpuWeightFormat, n_grid: int,
                  batch_size: int, awq_kwargs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Stopwatch, dict[str, Any]]:
    """AWQModifier + QuantizationModifier through ``oneshot`` on a copy of the model.

    Returns the float state (AWQ-scaled weights, 1/s folded into norms / v_proj / up_proj),
    the wall time, and the reference's own qparams per quantized Linear.
    """
    from datasets import Dataset

    model = copy.deepcopy(loaded.model)
    names = set(model.state_dict())
    seen_ids: list[torch.Tensor] = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: seen_ids.append(args[0].detach().cpu()))
    ds = Dataset.from_dict({"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()})
    scheme = ref["QuantizationScheme"](targets=["Linear"], weights=reference_args(ref, fmt))
    modifier = ref["AWQModifier"](n_grid=n_grid, **awq_kwargs)
    metrics: list[dict[str, Any]] = []
    keep = modifier._log_error_metrics  # the per-mapping losses are cleared at finalize: keep a copy
    object.__setattr__(modifier, "_log_error_metrics", lambda: (metrics.extend(copy.deepcopy(modifier._error_metrics)), keep()))
    recipe = [modifier, ref["QuantizationModifier"](config_groups={"group_0": scheme}, ignore=["lm_head"])]
    with Stopwatch() as clock:
        ref["oneshot"](model=model, tokenizer=loaded.tokenizer, dataset=ds, recipe=recipe,
                       num_calibration_samples=samples.shape[0], max_seq_length=samples.shape[1],
                       shuffle_calibration_samples=False, batch_size=batch_size, pipeline="sequential")
    hook.remove()
    fed = torch.unique(torch.cat(seen_ids), dim=0)
    if not torch.equal(fed, torch.unique(samples, dim=0)):
        raise RuntimeError("llm-compressor was not fed exactly our calibration windows")
    # on a GPU, oneshot leaves modules on the device: everything is compared and kept on the CPU
    qparams = {n: (m.weight_scale.detach().cpu().clone(), m.weight_zero_point.detach().cpu().clone())
               for n, m in model.named_modules() if hasattr(m, "weight_scale")}
    observer_match = all(torch.equal(qparams[n][0], observer_qparams(ref, model.get_submodule(n).weight.data.cpu(), fmt)[0])
                         for n in qparams)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in names}
    details = {"awq_kwargs": {"n_grid": n_grid, **awq_kwargs}, "batch_size": batch_size, "pipeline": "sequential",
               "weight_observer": "memoryless_minmax (default)", "quantized_linears": len(qparams),
               "stored_scales_equal_observer_on_float_weights": observer_match,
               "mappings": [{k: m[k] for k in ("layer_name", "parent_name", "initial_error", "best_error")} for m in metrics]}
    del model
    return state, clock, {"qparams": qparams, **details}


def observer_qparams(ref, w: torch.Tensor, fmt: TpuWeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of llm-compressor's default weight observer (memoryless min/max)."""
    obs = ref["Observer"].load_from_registry("memoryless_minmax", base_name="weight", args=reference_args(ref, fmt))
    obs(w)
    qp = obs.get_qparams()
    return qp["scale"], qp["zero_point"]


def reference_fake_quant(ref, model: torch.nn.Module, linears: list[str], fmt: TpuWeightFormat,
                         qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """compressed-tensors' QDQ of each quantized Linear: its stored qparams, else its min/max observer's."""
    args = reference_args(ref, fmt)
    for name in linears:
        linear = model.get_submodule(name)
        w = linear.weight.data
        scale, zero = qparams[name] if qparams is not None else observer_qparams(ref, w, fmt)
        linear.weight.data = ref["fake_quantize"](w, scale, zero, args).to(w.dtype)


# -- ours ---------------------------------------------------------------------------------------
class _FixedSamples(Quantizer):
    """Our pipeline end to end (save included), calibrated on token windows built once by the benchmark."""

    def __init__(self, cfg, samples: torch.Tensor) -> None:
        super().__init__(cfg, overwrite=True, progress=False)
        self.samples = samples
        self.clock = Stopwatch()

    def _calibration_inputs(self, loaded: LoadedModel):
        bs = self.samples.shape[0] if self.cfg.calib.bs == -1 else self.cfg.calib.bs
        batches = [self.samples[i:i + bs] for i in range(0, self.samples.shape[0], bs)]
        return capture_block_inputs(loaded.model, loaded.spec, batches, store_device=self.device)

    def quantize(self, loaded: LoadedModel):
        with self.clock:  # the quantize stage alone: calibration forwards + AWQ + TPU RTN codes
            return super().quantize(loaded)


def awq_config(model_path: str, calib_path: str, samples: torch.Tensor, group_size: int, n_grid: int,
               special: dict[str, Any], save_path: str):
    """Our config for this comparison: W4 asymmetric per group, all samples in one batch, CPU."""
    return parse_config({
        "model": {"path": model_path},
        "calib": {"name": "custom_txt", "path": calib_path, "n_samples": samples.shape[0], "seq_len": samples.shape[1],
                  "bs": -1},
        "eval": {"eval_pos": []},
        "quant": {"method": "Awq", "weight": {"bit": 4, "symmetric": False, "granularity": "per_group",
                                              "group_size": group_size},
                  "special": {"trans": True, "n_grid": n_grid, **special}},
        "save": {"save_path": save_path, "save_trans": True},
        "run": {"device": "cpu"},
    }, source="benchmark")


def run_ours(model_path: str, calib_path: str, samples: torch.Tensor, group_size: int, n_grid: int,
             special: dict[str, Any], workdir: Path) -> tuple[dict[str, torch.Tensor], Stopwatch, dict[str, Any]]:
    """Our AWQ through the real pipeline; returns the saved ``transformed_model/`` (what TPU-MLIR reads)."""
    from safetensors.torch import load_file

    cfg = awq_config(model_path, calib_path, samples, group_size, n_grid, special, str(workdir))
    quantizer = _FixedSamples(cfg, samples)
    report = quantizer.run()
    folder = Path(report.outputs["transformed_model"])
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    blocks = report.method["blocks"]
    details = {"special": cfg.quant.special, "transformed_model": "saved by the pipeline, read back",
               "subsets": [{"block": b["block"], "layers": s["layers"], "ratio": s["ratio"], "loss": s["loss"],
                            "loss_rtn": s["loss_rtn"]} for b in blocks for s in b.get("scaled", [])],
               "skipped": sorted({sk["reason"].split(":")[0] for b in blocks for sk in b.get("skipped", [])}),
               "clip_err": [{"block": b["block"], **c} for b in blocks for c in b.get("clipped", [])]}
    return state, quantizer.clock, details


# -- evaluation ---------------------------------------------------------------------------------
def quantized_linears(loaded: LoadedModel) -> list[str]:
    return [f"{loaded.spec.blocks}.{i}.{n}" for i in range(len(blocks_of(loaded.model, loaded.spec)))
            for n in loaded.spec.linear_names]


def tpu_fake_quant(model: torch.nn.Module, loaded: LoadedModel, fmt: TpuWeightFormat) -> None:
    """What TPU-MLIR computes from this float model: its RTN of the bf16 weights, Linear by Linear."""
    for i, block in enumerate(blocks_of(model, loaded.spec)):
        apply_fake_quant(model, quantize_block(block, loaded.spec, fmt, f"{loaded.spec.blocks}.{i}"))


def ppl_of(loaded: LoadedModel, state: dict[str, torch.Tensor] | None, win: torch.Tensor, bs: int,
           quantize: Callable[[torch.nn.Module], None] | None) -> float:
    model = copy.deepcopy(loaded.model)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if quantize is not None:
        quantize(model)
    model.eval()
    return perplexity(whole_model_logits(model, win, bs, CPU)).ppl


# -- report -------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    versions = package_versions(("torch", "transformers", "llmcompressor", "compressed-tensors", "accelerate", "datasets"))
    commit = git_commit(ROOT, mark_modified="llmc_tpu")
    return {"device": f"CPU, {os.cpu_count()} cores", "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "llmc_tpu_commit": commit, "versions": versions}


def mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def table(results: dict[str, list[Row]], base: float, seeds: list[int]) -> str:
    """One line per row, averaged over the calibration seeds (per-seed TPU numbers alongside)."""
    f = lambda x, d=4: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    per_seed = "/".join(str(s) for s in seeds)
    lines = [f"| row | wall s | CPU s | ppl TPU RTN (mean) | ppl TPU RTN, seed {per_seed} | ppl ref RTN (mean) | TPU vs float |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        if rows[0].kind == "float":
            lines.append(f"| {name} | - | - | {base:.4f} (no quant) | - | - | 0 |")
            continue
        tpu = mean([r.ppl_tpu for r in rows])
        seeds_txt = " / ".join(f(r.ppl_tpu, 3) for r in rows) if len(rows) > 1 else "-"
        lines.append(f"| {name} | {f(mean([r.seconds for r in rows]), 1)} | {f(mean([r.cpu_seconds for r in rows]), 1)} | "
                     f"{f(tpu)} | {seeds_txt} | {f(mean([r.ppl_ref for r in rows]))} | {tpu - base:+.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: /tmp/refvenv/bin/python benchmarks/awq_vs_reference.py --seeds 42 --out /tmp/awq_vs_reference.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "data/models/shakespeare-llama"), help="HF Llama-family folder")
    ap.add_argument("--calib", default=str(ROOT / "data/LLM/cali/tinyshakespeare/train.txt"), help="calibration .txt")
    ap.add_argument("--eval", default=str(ROOT / "data/LLM/eval/tinyshakespeare/test.txt"), help="eval .txt")
    ap.add_argument("--n-samples", type=int, default=64, help="calibration windows (default 64, as demo_awq.yml)")
    ap.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    ap.add_argument("--preproc", default="random_truncate_txt", help="llmc_tpu calib preproc (default random_truncate_txt)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 7],
                    help="calibration sample seeds; every method runs once per seed on the same windows (default 42 1 7)")
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--eval-bs", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-grid", type=int, default=20)
    ap.add_argument("--ref-batch-size", type=int, default=16, help="llm-compressor calibration batch size (its losses "
                    "are summed over batches, so this changes speed, not the result)")
    ap.add_argument("--only", choices=["all", "primary"], default="all",
                    help="primary: just the first variant of ours and of the reference")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)

    logging.getLogger("llmc_tpu").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    ref = import_reference()
    try:  # llm-compressor logs every grid point at INFO/progress level
        from loguru import logger
        logger.remove()
        logger.add(sys.stderr, level="WARNING")
    except ImportError:
        pass

    load_at_start = round(os.getloadavg()[0], 2)  # wall times mean little on a busy machine: record how busy
    loaded = load_model(args.model)
    linears = quantized_linears(loaded)
    texts = calibration_texts("custom_txt", args.calib)
    tokens = loaded.tokenizer(eval_text("custom_ppl", args.eval), return_tensors="pt").input_ids[0]
    win = windows(tokens, args.eval_seq_len)
    print(f"model {args.model} ({sum(p.numel() for p in loaded.model.parameters()) / 1e6:.2f}M params, "
          f"{next(loaded.model.parameters()).dtype}); calib {args.n_samples} x {args.calib_seq_len}, seeds {args.seeds}; "
          f"eval {tuple(win.shape)}", flush=True)

    def evaluate(row: Row, state, qparams=None) -> None:
        row.ppl_tpu = ppl_of(loaded, state, win, args.eval_bs, lambda m: tpu_fake_quant(m, loaded, fmt))
        row.ppl_ref = ppl_of(loaded, state, win, args.eval_bs, lambda m: reference_fake_quant(ref, m, linears, fmt, qparams))
        print(f"  {row.name}: {row.seconds or 0:.1f} s wall, {row.cpu_seconds or 0:.1f} s CPU, "
              f"ppl TPU RTN {row.ppl_tpu:.4f}, ref RTN {row.ppl_ref:.4f}", flush=True)

    ours = list(OURS.items())[:1] if args.only == "primary" else list(OURS.items())
    refs = list(REFERENCE.items())[:1] if args.only == "primary" else list(REFERENCE.items())
    results: dict[str, list[Row]] = {}
    calib_infos = []
    for seed in args.seeds:
        samples, calib_info = build_samples(texts, loaded.tokenizer, args.preproc, args.n_samples, args.calib_seq_len, seed)
        calib_infos.append(calib_info)
        fmt = tpu_format(awq_config(args.model, args.calib, samples, args.group_size, args.n_grid, {}, "/unused"))
        if not results:  # the float model and plain RTN need no calibration: once
            base = ppl_of(loaded, None, win, args.eval_bs, None)  # also warms up the CPU kernels before anything is timed
            results["float (bf16, unquantized)"] = [Row("float (bf16, unquantized)", "float", details={"ppl": base})]
            print(f"  float: ppl {base:.4f}", flush=True)
            rtn = Row("RTN (no AWQ)", "rtn")
            evaluate(rtn, None)
            results[rtn.name] = [rtn]
        print(f"seed {seed}", flush=True)
        for i, (oname, special) in enumerate(ours):
            with tempfile.TemporaryDirectory(prefix="awq_bench_") as tmp:
                state, clock, details = run_ours(args.model, args.calib, samples, args.group_size, args.n_grid, special,
                                                 Path(tmp) / f"ours_{i}")
            row = Row(oname, "ours", clock.wall, clock.cpu, details={"seed": seed, **details})
            evaluate(row, state)
            results.setdefault(oname, []).append(row)
        for rname, awq_kwargs in refs:
            state, clock, details = run_reference(ref, loaded, samples, fmt, args.n_grid, args.ref_batch_size, awq_kwargs)
            qparams = details.pop("qparams")
            row = Row(rname, "reference", clock.wall, clock.cpu, details={"seed": seed, **details})
            evaluate(row, state, qparams)
            results.setdefault(rname, []).append(row)

    text = table(results, base, args.seeds)
    print()
    print(text)
    primary_ours, primary_ref = results[ours[0][0]], results[refs[0][0]]
    wins = sum(o.ppl_tpu <= r.ppl_tpu for o, r in zip(primary_ours, primary_ref))
    print(f"\n{ours[0][0]} <= {refs[0][0]} (ppl TPU RTN) on {wins} of {len(args.seeds)} seeds")
    env = environment()
    env["load_average_1min_at_start"] = load_at_start
    result = {
        "benchmark": "AWQ: llmc_tpu vs llm-compressor AWQModifier, scored with TPU-MLIR's RTN",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": env,
        "reference": f"llmcompressor {env['versions']['llmcompressor']} (AWQModifier + QuantizationModifier via oneshot, "
                     f"compressed-tensors {env['versions']['compressed-tensors']})",
        "model": args.model, "format": f"W4 asymmetric, group {args.group_size} (TPU-MLIR W4BF16, chip {fmt.chip})",
        "calibration": {"path": args.calib, "seeds": args.seeds, "per_seed": calib_infos, "same_ids_fed_to_both": True},
        "eval": {"path": args.eval, "seq_len": args.eval_seq_len, "windows": int(win.shape[0]), "bs": args.eval_bs},
        "columns": {"ppl_tpu_rtn": "llmc_tpu.tpu.rtn.fake_quantize of the bf16 float weights (what TPU-MLIR computes)",
                    "ppl_ref_rtn": "compressed-tensors fake_quantize with min/max qparams (the reference row: its stored qparams)",
                    "seconds": "wall time of the quantization call (calibration passes included, eval excluded)",
                    "cpu_seconds": "CPU time of this process during that call (all threads)"},
        "summary": {"float_ppl": base, "primary_ours": ours[0][0], "primary_reference": refs[0][0],
                    "primary_ours_at_least_as_good_on_seeds": f"{wins}/{len(args.seeds)}",
                    "mean_ppl_tpu_rtn": {n: mean([r.ppl_tpu for r in rows]) for n, rows in results.items() if rows[0].kind != "float"},
                    "mean_cpu_seconds": {n: mean([r.cpu_seconds for r in rows]) for n, rows in results.items()
                                         if rows[0].kind in ("ours", "reference")}},
        "rows": [{"name": r.name, "kind": r.kind, "seconds": r.seconds, "cpu_seconds": r.cpu_seconds,
                  "ppl_tpu_rtn": r.ppl_tpu, "ppl_ref_rtn": r.ppl_ref,
                  **({"ppl": r.details["ppl"]} if r.kind == "float" else {"details": r.details})}
                 for rows in results.values() for r in rows],
        "table": text,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
