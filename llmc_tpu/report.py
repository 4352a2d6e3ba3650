"""The run report: report.json (machine-readable) and report.md (for people), plus the console summary."""

from __future__ import annotations

import json
import platform
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc_tpu.tpu.rtn import TpuWeightFormat


def versions() -> dict[str, str]:
    import torch
    import transformers

    import llmc_tpu

    return {"llmc_tpu": llmc_tpu.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def llm_convert_command(model_dir: Path, fmt: TpuWeightFormat, seq_length: int, out_dir: Path) -> str:
    """The TPU-MLIR command that compiles the transformed model into a bmodel."""
    args = ["llm_convert.py", "-m", str(model_dir), "-s", str(seq_length), "-q", fmt.llm_convert_quantize,
            "-g", str(fmt.group_size), "-c", fmt.chip, "-o", str(out_dir)]
    if fmt.symmetric:
        args.append("--symmetric")
    return shlex.join(args)


@dataclass
class RunReport:
    config: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    tpu_format: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    ppl: dict[str, dict[str, float]] = field(default_factory=dict)
    token_consistency: dict[str, float] = field(default_factory=dict)
    vqa: dict[str, dict[str, Any]] = field(default_factory=dict)  # VLMs: eval_pos -> set -> MME-style accuracy
    quantized: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    peak_memory_gib: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> peaks so far, once it ran
    outputs: dict[str, str] = field(default_factory=dict)
    onnx: dict[str, Any] = field(default_factory=dict)  # save_onnx: pieces and their max relative error vs torch
    exports: dict[str, dict[str, Any]] = field(default_factory=dict)  # GPU exports: folder, status, serving kernels
    next_steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the user must know about this result
    versions: dict[str, str] = field(default_factory=versions)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def ppl_table(self) -> str:
        datasets = sorted({d for row in self.ppl.values() for d in row})
        if not datasets:
            return "(no evaluation)"
        head = f"| {'eval_pos':<12} | " + " | ".join(f"{d:>12}" for d in datasets) + " |"
        sep = "|" + "-" * 14 + "|" + "|".join("-" * 14 for _ in datasets) + "|"
        rows = [f"| {pos:<12} | " + " | ".join(f"{self.ppl[pos].get(d, float('nan')):>12.4f}" for d in datasets) + " |"
                for pos in self.ppl]
        return "\n".join([head, sep, *rows])

    def summary(self) -> str:
        lines = ["", "Perplexity (token level, lower is better)", self.ppl_table()]
        lines += [f"WARNING: {w}" for w in self.warnings]
        for name, value in self.token_consistency.items():
            lines.append(f"token consistency fake_quant vs pretrain on {name}: {value:.4f}")
        for pos, sets in self.vqa.items():
            for name, r in sets.items():
                lines.append(f"{pos} {name}: accuracy {r['acc']:.4f}, score {r['score']:.1f} ({r['questions']} questions)")
        q = self.quantized
        if q:
            lines.append(f"\nquantized Linears: {q.get('n_linears', 0)} ({q.get('format', '')}); "
                         f"rows left in float by the chip's NPU rule: {q.get('float_rows', 0)}; "
                         f"Linears folded back to float: {len(q.get('folded_to_float', []))}")
            if q.get("uncalibrated"):
                lines.append(f"MoE expert Linears no calibration token reached (plain TPU RTN): {len(q['uncalibrated'])}")
        if self.onnx:
            lines.append(f"onnx: {len(self.onnx['pieces'])} pieces, max relative error onnxruntime vs torch "
                         f"{self.onnx['max_rel_error']:.1e} ({self.onnx['worst_piece']})")
        lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings_s.items()))
        if self.peak_memory_gib:
            last = list(self.peak_memory_gib.values())[-1]
            lines.append("peak memory: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f} GiB" for k, v in last.items()))
        if self.outputs:
            lines.append("outputs:")
            lines += [f"  {k}: {v}" for k, v in self.outputs.items()]
        for key in self.failed_exports:
            lines.append(f"WARNING: {key} failed, not written: {self.exports[key]['error']}")
        if self.next_steps:
            lines.append("next:")
            lines += [f"  {s}" for s in self.next_steps]
        return "\n".join(lines)

    @property
    def failed_exports(self) -> list[str]:
        return [k for k, v in self.exports.items() if v.get("status") == "failed"]

    def exports_markdown(self) -> list[str]:
        """The "GPU exports" section: each export's folder (or why it failed) and which kernels can serve it."""
        if not self.exports:
            return []
        lines = ["## GPU exports", ""]
        for key, e in self.exports.items():
            if e.get("status") == "failed":
                lines += [f"### {key}: FAILED", "", e["error"], ""]
                continue
            lines += [f"### {key}: `{e['folder']}`", "", f"{e['format']}; {e['weights']}; {e['linears']} Linears.", ""]
            if e.get("note"):
                lines += [e["note"], ""]
            lines += ["| engine | kernel | serves it | why |", "| --- | --- | --- | --- |"]
            lines += [f"| {s['engine']} | {s['kernel']} | {'yes' if s['ok'] else 'no'} | {s['why']} |" for s in e["serving"]]
            lines.append("")
        return lines

    def data_markdown(self) -> list[str]:
        """Which data the run used (calibration and evaluation), and MME-style accuracies."""
        lines = ["## Data", ""] if self.data or self.vqa else []
        for purpose, info in self.data.items():
            if purpose == "calib":
                lines.append(f"- calib: {info.get('name')} from `{info.get('path')}` "
                             + ", ".join(f"{k} {info[k]}" for k in ("used_samples", "n_samples", "seq_len", "bs") if k in info))
                lines += [f"  - {n}" for n in info.get("notes", [])]
            else:
                lines += [f"- {purpose} {name}: {v.get('name')} from `{v.get('path')}`" for name, v in info.items()]
        for pos, sets in self.vqa.items():
            lines += [f"- {pos} {name}: accuracy {r['acc']:.4f}, acc+ per category and score {r['score']:.1f} in report.json"
                      for name, r in sets.items()]
        return lines + ([""] if lines else [])

    def memory_markdown(self) -> list[str]:
        """Peak host RSS and GPU memory, as they stood after each stage (the first stage to show a peak made it)."""
        if not self.peak_memory_gib:
            return []
        lines = ["## Peak memory (GiB, so far, after each stage)", "", "| stage | host RSS | GPU allocated |",
                 "| --- | --- | --- |"]
        for stage, peaks in self.peak_memory_gib.items():
            lines.append(f"| {stage} | {peaks.get('host_rss', '-')} | {peaks.get('gpu_allocated', '-')} |")
        return lines + [""]

    def write(self, folder: Path) -> None:
        (folder / "report.json").write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
        (folder / "report.md").write_text(self.markdown(), encoding="utf-8")

    def markdown(self) -> str:
        cfg = json.dumps(self.config, indent=2)
        return "\n".join([
            f"# llmc_tpu run: {self.config['run']['task_name']}", "",
            f"Model: `{self.model.get('path')}` ({self.model.get('model_type')}); method "
            f"{self.config['quant']['method']}; TPU format {self.tpu_format.get('name')} on {self.tpu_format.get('chip')}.", "",
            "## Perplexity", "", self.ppl_table(), "",
            *self.data_markdown(),
            "## Next steps", "", *[f"    {s}" for s in self.next_steps], "",
            *self.exports_markdown(),
            "## Timings (s)", "", *[f"- {k}: {v:.2f}" for k, v in self.timings_s.items()], "",
            *self.memory_markdown(),
            "## Resolved config (every default filled)", "", "```json", cfg, "```", "",
            "## Versions", "", *[f"- {k}: {v}" for k, v in self.versions.items()], "",
        ])
