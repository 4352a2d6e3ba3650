#!/usr/bin/env python3
"""Accuracy on a real model: every llmc_tpu method, scored as the TPU computes it, and llm-compressor's AWQ and GPTQ
on the same calibration windows.

Model: SmolLM2-135M-Instruct built by ``tools/build_smollm2.py`` (Llama layout, 30 blocks, GQA 9/3, tied
embeddings; its weights sit on a Q4_1 g32 grid, so W4 g64 is the real test). Format: W4 asymmetric, group 64,
bf16 (``llm_convert.py -q w4bf16 -g 64``).

Data, built from what every machine here has (no hub): calibration = tinyshakespeare's train split
(``data/LLM/cali``) plus the first 70% of Python's own documentation text (``pydoc_data.topics``), 128 random
windows of 512 tokens (``random_truncate_txt``, seed 42); evaluation = tinyshakespeare's test split and the
last 30% of the Python text, windows of 512.

Each row's perplexity is that of the weights the TPU multiplies with:
- ours: the run's ``fake_quant`` perplexity. AWQ hands over a float model that TPU-MLIR's RTN turns into exactly
  those weights; GPTQ / SignRound hand over a GPTQ checkpoint whose codes ``llm_convert.py -q auto`` keeps
  (``llmc-tpu verify`` checks both, code for code).
- llm-compressor: its float result re-gridded by TPU-MLIR's RTN (``tpu``: what the chip would run) and, for
  reference, its own compressed-tensors QDQ (``own``).
``gap closed`` = (RTN - ppl) / (RTN - float), per eval text. Wall time is the whole run (ours: load, calibration,
quantize, evaluation, save) and the quantize stage alone; llm-compressor's is its ``oneshot`` call.

Run it where llm-compressor is importable (never in the project's venv; see benchmarks/README.md), on a GPU:

    python tools/build_smollm2.py --out models/SmolLM2-135M-Instruct
    python benchmarks/accuracy_smollm2.py --model models/SmolLM2-135M-Instruct
    python benchmarks/accuracy_smollm2.py --only ours --rows GPTQ SignRound     # a subset, no llm-compressor
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from _common import git_commit, package_versions, write_result  # noqa: E402

from llmc_tpu.config.load import parse_config  # noqa: E402
from llmc_tpu.data.calib import build_samples, calibration_texts  # noqa: E402
from llmc_tpu.engine.blockwise import blocks_of  # noqa: E402
from llmc_tpu.engine.forward import whole_model_logits  # noqa: E402
from llmc_tpu.eval.ppl import perplexity, windows  # noqa: E402
from llmc_tpu.fake_quant import apply_fake_quant, quantize_block  # noqa: E402
from llmc_tpu.models.loading import load_model  # noqa: E402
from llmc_tpu.pipeline import Quantizer  # noqa: E402
from llmc_tpu.tpu.rtn import TpuWeightFormat  # noqa: E402

FMT = TpuWeightFormat(4, 64)
AWQ = {"trans_version": "v1", "clip_sym": False}  # s = x^r / w^(1-r), asymmetric clip search


def sink_weight_rows(weight: float) -> dict[str, dict[str, Any]]:
    """GPTQ in natural order and in act-order with the attention sink counted ``weight`` times."""
    return {f"GPTQ natural order, sink_weight {weight:g}": {"method": "GPTQ", "special": {
                "actorder": False, "static_groups": False, "sink_weight": weight}},
            f"GPTQ, sink_weight {weight:g}": {"method": "GPTQ", "special": {"sink_weight": weight}}}


ROWS: dict[str, dict[str, Any]] = {  # row -> quant section
    "RTN": {"method": "RTN"},
    "AWQ": {"method": "Awq", "special": AWQ},
    # natural order runs 3 sweeps of coordinate descent on its codes by default (refine_sweeps); "no refine": without
    "GPTQ natural order": {"method": "GPTQ", "special": {"actorder": False, "static_groups": False}},
    "GPTQ natural order, no refine": {"method": "GPTQ", "special": {"actorder": False, "static_groups": False,
                                                                    "refine_sweeps": 0}},
    "GPTQ": {"method": "GPTQ"},  # the default: act-order, static groups, token_clip 10, sink_weight 16
    "Awq+GPTQ natural order": {"method": ["Awq", "GPTQ"], "special": {**AWQ, "actorder": False, "static_groups": False}},
    "Awq+GPTQ": {"method": ["Awq", "GPTQ"], "special": AWQ},
    **sink_weight_rows(1),  # the attention sink counted as one token (before sink_weight): what it changes
    "SignRound": {"method": "SignRound"},
    "Awq+SignRound": {"method": ["Awq", "SignRound"], "special": AWQ},
}
TRAIN_SHARE = 0.7


def build_texts(folder: Path) -> tuple[Path, dict[str, Path]]:
    """The calibration mix and the two eval texts, written to ``folder``."""
    from pydoc_data.topics import topics

    doc = "\n\n".join(topics[k].strip() for k in sorted(topics))
    cut = doc.index("\n", int(len(doc) * TRAIN_SHARE))
    shakespeare = REPO / "data" / "LLM"
    calib = folder / "calib_mix.txt"
    calib.write_text((shakespeare / "cali" / "tinyshakespeare" / "train.txt").read_text() + "\n" + doc[:cut])
    pydoc_test = folder / "pydoc_test.txt"
    pydoc_test.write_text(doc[cut:])
    return calib, {"shakespeare": shakespeare / "eval" / "tinyshakespeare" / "test.txt", "pydoc": pydoc_test}


def ours(row: str, model: Path, calib: Path, evals: dict[str, Path], args, out: Path) -> dict[str, Any]:
    cfg = parse_config({
        "base": {"seed": args.seed},
        "model": {"path": str(model)},
        "calib": {"name": "custom_txt", "path": str(calib), "preproc": "random_truncate_txt",
                  "n_samples": args.n_samples, "seq_len": args.calib_seq_len},
        "eval": {"eval_pos": ["pretrain", "fake_quant"] if row == "RTN" else ["fake_quant"],
                 "name": ["custom_ppl"] * len(evals), "path": [str(p) for p in evals.values()],
                 "seq_len": args.eval_seq_len, "bs": args.eval_bs},
        "quant": {"weight": {"bit": FMT.bits, "group_size": FMT.group_size}, "quant_out": True, **ROWS[row]},
        "save": {"save_path": str(out / row.replace(" ", "_").replace("+", "_"))},
    }, source=row)
    start = time.perf_counter()
    report = Quantizer(cfg, overwrite=True, progress=False).run()
    wall = time.perf_counter() - start
    rename = dict(zip([p.stem for p in evals.values()], evals))
    ppl = {pos: {rename[k]: v for k, v in values.items()} for pos, values in report.ppl.items()}
    return {"ppl": ppl["fake_quant"], "float": ppl.get("pretrain"), "wall_s": round(wall, 1),
            "quantize_s": round(report.timings_s["quantize"], 1), "special": cfg.quant.special}


def tpu_regrid(model: torch.nn.Module, spec) -> None:
    """What TPU-MLIR computes from a float model: its RTN of the (bf16) weights."""
    for i, block in enumerate(blocks_of(model, spec)):
        apply_fake_quant(model, quantize_block(block, spec, FMT, f"{spec.blocks}.{i}"))


def reference(kind: str, loaded, samples: torch.Tensor, evals: dict[str, torch.Tensor], args,
              device: torch.device) -> dict[str, Any]:
    """llm-compressor's AWQ (AWQModifier + QuantizationModifier) or GPTQ (GPTQModifier, its default act-order)."""
    import awq_vs_reference
    import gptq_vs_reference

    start = time.perf_counter()
    if kind == "AWQ":
        ref = awq_vs_reference.import_reference()
        state, _, details = awq_vs_reference.run_reference(ref, loaded, samples, FMT, 20, args.ref_bs, {})
        qparams = details.pop("qparams")
        details.pop("mappings", None)
    else:
        ref = gptq_vs_reference.import_reference()
        state, _, details = gptq_vs_reference.run_reference(ref, loaded, samples, FMT, "static", 0.01, 128, args.ref_bs)
        qparams = None
    wall = time.perf_counter() - start
    scores: dict[str, dict[str, float]] = {"tpu": {}, "own": {}}
    for how in scores:
        model = copy.deepcopy(loaded.model)
        model.load_state_dict(state, strict=False)
        if how == "tpu":
            tpu_regrid(model, loaded.spec)
        elif qparams is not None:  # AWQ's result is float: its own QDQ with the scales it stored
            awq_vs_reference.reference_fake_quant(awq_vs_reference.import_reference(), model, list(qparams), FMT, qparams)
        for name, win in evals.items():  # GPTQ's state already holds its own QDQ'd weights
            scores[how][name] = perplexity(whole_model_logits(model, win, args.eval_bs, device)).ppl
        del model
    return {"ppl": scores["tpu"], "ppl_own": scores["own"], "wall_s": round(wall, 1), "details": details}


def table(rows: dict[str, dict[str, Any]], base: dict[str, float], rtn: dict[str, float]) -> str:
    names = list(base)
    head = "| row | " + " | ".join(f"{n} ppl | {n} gap closed" for n in names) + " | wall s | quantize s |"
    lines = [head, "|" + "---|" * (2 * len(names) + 3)]
    lines.append("| float | " + " | ".join(f"{base[n]:.2f} | -" for n in names) + " | - | - |")
    for row, r in rows.items():
        if "error" in r:
            lines.append(f"| {row} | error: {r['error'][:80]} |")
            continue
        cells = [f"{r['ppl'][n]:.2f} | {100 * (rtn[n] - r['ppl'][n]) / (rtn[n] - base[n]):.0f}%" for n in names]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {r['wall_s']} | {r.get('quantize_s', r['wall_s'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    """``description``: the --help text of a script that runs this benchmark with rows of its own (default: this one's)."""
    ap = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Example: python benchmarks/accuracy_smollm2.py --model models/SmolLM2-135M-Instruct")
    ap.add_argument("--model", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="our methods to run")
    ap.add_argument("--sink-weights", type=float, nargs="+", default=[],
                    help="also run GPTQ (natural order and act-order) with each of these sink_weight values")
    ap.add_argument("--only", choices=["ours", "reference"], help="run only our rows or only llm-compressor's")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-bs", type=int, default=16)
    ap.add_argument("--ref-bs", type=int, default=16, help="llm-compressor's calibration batch size")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "accuracy_smollm2.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: dict[str, dict[str, Any]] = {}

    def save(rows: dict[str, dict[str, Any]]) -> None:  # after every row: an interrupted run keeps what it measured
        write_result(result(args, rows, ["shakespeare", "pydoc"], device), args.out)

    with tempfile.TemporaryDirectory() as tmp:
        calib, eval_paths = build_texts(Path(tmp))
        for weight in args.sink_weights:
            extra = sink_weight_rows(weight)
            ROWS.update(extra)
            args.rows += list(extra)
        names = [r for r in args.rows if args.only != "reference"]
        if "RTN" not in names:
            names.insert(0, "RTN")  # the float and RTN perplexities every row is measured against
        for row in names:
            try:
                rows[row] = ours(row, args.model, calib, eval_paths, args, Path(tmp) / "out")
            except Exception as exc:  # one failed row does not lose the others
                rows[row] = {"error": f"{type(exc).__name__}: {exc}"}
            print(row, rows[row].get("ppl", rows[row].get("error")), flush=True)
            save(rows)
        base, rtn = rows["RTN"]["float"], rows["RTN"]["ppl"]
        if args.only != "ours":
            loaded = load_model(str(args.model), None, "auto", "fast", False)
            samples, _ = build_samples(calibration_texts("custom_txt", str(calib)), loaded.tokenizer,
                                       "random_truncate_txt", args.n_samples, args.calib_seq_len, args.seed)
            evals = {n: windows(loaded.tokenizer(p.read_text(), return_tensors="pt", verbose=False).input_ids[0],
                                args.eval_seq_len) for n, p in eval_paths.items()}
            for kind in ("AWQ", "GPTQ"):
                try:
                    rows[f"llm-compressor {kind}"] = reference(kind, loaded, samples, evals, args, device)
                except (Exception, SystemExit) as exc:
                    rows[f"llm-compressor {kind}"] = {"error": f"{type(exc).__name__}: {exc}"}
                print(kind, rows[f"llm-compressor {kind}"].get("ppl"), flush=True)
                save(rows)
    print("\n" + table(rows, base, rtn))
    save(rows)
    return 0


def result(args, rows: dict[str, dict[str, Any]], eval_names: list[str], device: torch.device) -> dict[str, Any]:
    base = rows.get("RTN", {}).get("float")
    return {"benchmark": "accuracy_smollm2", "model": str(args.model), "format": "W4BF16 g64 asymmetric",
                  "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                  "calibration": {"n_samples": args.n_samples, "seq_len": args.calib_seq_len, "seed": args.seed,
                                  "text": f"tinyshakespeare train + first {TRAIN_SHARE:.0%} of pydoc_data.topics"},
            "eval": {"seq_len": args.eval_seq_len, "texts": eval_names},
            "float": base, "rows": rows, "commit": git_commit(REPO, "llmc_tpu"),
            "versions": package_versions(("torch", "transformers", "llmcompressor", "compressed-tensors"))}


if __name__ == "__main__":
    sys.exit(main())
