#!/usr/bin/env python3
"""The engine at real scale: time and peak memory of ``tpu/llm_quant.py`` on Llama-2-7B / 70B shapes, and of
llm-compressor's ``oneshot`` on the same model and the same calibration token ids.

What it does, for one ``--shape`` (random bf16 weights at the real sizes, so no download is needed):

1. Builds a Hugging Face Llama folder in ``WORKDIR/models/`` (on the GPU when there is one, saved as 2 GB
   safetensors shards, the demo model's tokenizer copied in) and reuses it on later runs (7B is 13.5 GB).
2. Writes a calibration .txt (the tinyshakespeare train split, one sample per line, repeated until it holds
   ``--samples`` windows of 2048 tokens).
3. Runs ours as a user does, in a fresh process: ``python tpu/llm_quant.py --config CFG.yml`` (``--nproc N``:
   ``torchrun --standalone --nproc-per-node N tpu/llm_quant.py ...``), evaluation off, saving what a user saves
   (AWQ: ``transformed_model/``; GPTQ: ``gptq_tpu_model/``) into a temporary folder that is deleted afterwards.
   The quantize time is the run's report (``timings_s.quantize``: calibration forward passes + every block).
4. Runs llm-compressor 0.14 (``oneshot``, sequential pipeline) in a fresh process on the same folder, fed the
   same token ids (built once with ``llmc_tpu.data.calib.build_samples``, as our run builds them from its
   config): GPTQModifier, or AWQModifier + QuantizationModifier; W4 asymmetric group 64. It saves nothing, so
   compare its ``oneshot`` time with our quantize time; its process time has no save in it.
5. Every process runs under ``benchmarks/_measure.py``: wall time, peak host RSS, CUDA peak allocated / reserved,
   and nvidia-smi's peak ``memory.used`` polled every 0.5 s.

Methods (``--methods``): ``awq`` = AWQ W4 asym g64, 128 x 512 windows, v1 scales, asymmetric clip search
(configs/LLM/AwqSignRound.yml's AWQ part); ``gptq`` = configs/LLM/GPTQ.yml (act-order, static groups,
128 x 2048, bs -1). The peer: AWQModifier's defaults (duo_scaling) / GPTQModifier actorder="static" (its default).

Examples (on one H200; each command must finish within 10 minutes there, so one method per command):

    python benchmarks/gpu_scale.py --shape 7b --build-only                    # build the 13.5 GB folder once
    python benchmarks/gpu_scale.py --shape 7b --methods gptq --no-peer        # ours only
    python benchmarks/gpu_scale.py --shape 7b --methods gptq --peer-only      # llm-compressor; rows are merged
    python benchmarks/gpu_scale.py --shape 7b --methods awq --peer-python /tmp/refvenv/bin/python   # peer in its venv
    python benchmarks/gpu_scale.py --shape 70b --layers 2 --methods awq       # 2 of 80 blocks, full time projected
    python benchmarks/gpu_scale.py --shape 70b --layers 2 --methods gptq --no-peer --device-memory-gib 24   # a 24 GB GPU
    python benchmarks/gpu_scale.py --shape 7b --methods gptq --no-peer --nproc 1 2  # 1 GPU, then torchrun on 2
    python benchmarks/gpu_scale.py --shape tiny --samples 8 --no-peer --out /tmp/t.json   # a CPU smoke run
    python benchmarks/gpu_scale.py --shape host --samples 8 --methods gptq --no-peer --out /tmp/host.json  # host RSS, CPU
    python benchmarks/gpu_scale.py --shape 7b --methods gptq --no-peer --repeat 2   # run ours twice: same bytes?

Rows of earlier runs in ``--out`` are kept unless the same (shape, layers, method, tool, processes, samples,
GPU cap) is measured again. Logs of every process (and a copy of our run's report.json) are in ``WORKDIR/logs/``.
The script also runs itself as the model builder (``_build``) and the llm-compressor worker (``_peer``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from _common import git_commit, package_versions, write_result  # noqa: E402  (benchmarks/ is on sys.path as a script)
from _measure import nvidia_smi  # noqa: E402

SELF = Path(__file__).resolve()  # the builder and the peer worker are this script, run again
MEASURE = SELF.parent / "_measure.py"
DEMO_MODEL = ROOT / "data" / "models" / "shakespeare-llama"  # its tokenizer (vocab 4096 < 32000: every id is valid)
CALIB_SOURCE = ROOT / "data" / "LLM" / "cali" / "tinyshakespeare" / "train.txt"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_scale.json"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "llmc_tpu_gpu_scale"
MARKER = "gpu_scale_model.json"  # written last by the builder: a folder without a matching one is rebuilt
SEED = 42
GROUP_SIZE = 64
MAX_POSITIONS = 4096
PEER_VERSIONS = ("torch", "transformers", "llmcompressor", "compressed-tensors", "accelerate", "datasets")
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """A Llama decoder stack's sizes."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int = 32000

    @property
    def parameters(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        block = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return 2 * self.vocab * self.hidden + self.layers * block + self.hidden  # untied embeddings and lm_head


SHAPES = {
    "7b": Shape(4096, 11008, 32, 32, 32),  # Llama-2-7B
    "70b": Shape(8192, 28672, 64, 8, 80),  # Llama-2-70B
    "tiny": Shape(64, 192, 4, 2, 4),  # a CPU smoke run (intermediate a multiple of the group size, as TPU-MLIR needs)
    "host": Shape(2048, 5632, 16, 16, 8),  # 7B's proportions at 1/4 width, 8 layers (1.1 GB): host memory on a CPU
}


@dataclass(frozen=True)
class Method:
    """Our config for one method (the sections a user edits in the template) and the peer's recipe name."""

    seq_len: int
    calib_bs: int
    quant: dict[str, Any]
    save: dict[str, Any]
    template: str


W4 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": GROUP_SIZE}
METHODS = {
    "awq": Method(512, -1, {"method": "Awq", "weight": W4,
                            "special": {"trans": True, "trans_version": "v1", "weight_clip": True, "clip_sym": False}},
                  {"save_trans": True}, "configs/LLM/AwqSignRound.yml (AWQ part), 128 x 512"),
    "gptq": Method(2048, -1, {"method": "GPTQ", "weight": W4, "quant_out": True,
                             "special": {"actorder": True, "static_groups": True, "percdamp": 0.01, "blocksize": 128,
                                         "true_sequential": True, "token_clip": 10.0}},
                   {}, "configs/LLM/GPTQ.yml, 128 x 2048"),
}


@dataclass
class Row:
    shape: str
    layers: int
    full_layers: int
    method: str
    tool: str  # ours | llm-compressor
    nproc: int
    samples: int
    seq_len: int
    exit_code: int | None = None
    process_s: float | None = None
    quantize_s: float | None = None  # ours: report timings_s.quantize; peer: the oneshot call
    gpu_allocated_gib: float | None = None  # max over devices (CUDA's own peak; null when CUDA was not used here)
    gpu_reserved_gib: float | None = None
    gpu_smi_gib: float | None = None  # max over GPUs of nvidia-smi's memory.used, polled
    rss_gib: float | None = None  # the larger of this process's and its largest child's peak
    projected_full_s: float | None = None  # --layers runs: the quantize time for every layer of the shape
    device_memory_gib: float | None = None  # ours: run.device_memory_gib (PyTorch's allocator capped there)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return self.shape, self.layers, self.method, self.tool, self.nproc, self.samples, self.device_memory_gib


# -- the model folder -------------------------------------------------------------------------------
def model_marker(name: str, shape: Shape) -> dict[str, Any]:
    return {"shape": name, **asdict(shape), "seed": SEED, "dtype": "bfloat16",
            "init": "Linear/Embedding normal(0, 0.02), RMSNorm 1", "tokenizer": str(DEMO_MODEL.relative_to(ROOT))}


def build_main(argv: list[str]) -> int:
    """``_build``: a Llama with random bf16 weights, made on the fastest device and saved with a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ap = argparse.ArgumentParser(prog="gpu_scale.py _build")
    ap.add_argument("--marker", required=True, help="the marker as JSON (model_marker)")
    ap.add_argument("--folder", type=Path, required=True)
    args = ap.parse_args(argv)
    marker = json.loads(args.marker)
    shape = Shape(**{k: marker[k] for k in Shape.__dataclass_fields__})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3, dtype="bfloat16")
    start = time.perf_counter()
    with torch.device("meta"):  # no memory and no init yet: the weights are made once, in bf16, on the device
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device=device)
    torch.manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    created = time.perf_counter() - start
    model.save_pretrained(args.folder, max_shard_size="2GB")
    for f in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy2(DEMO_MODEL / f, args.folder / f)
    tok_config = json.loads((DEMO_MODEL / "tokenizer_config.json").read_text())
    tok_config["model_max_length"] = MAX_POSITIONS  # no "sequence longer than 512" warnings for 2048-token windows
    (args.folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (args.folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    print(f"built {args.folder} on {device}: weights made in {created:.1f} s, saved in "
          f"{time.perf_counter() - start - created:.1f} s", flush=True)
    return 0


def check_disk(folder: Path, need_bytes: float, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise SystemExit(f"{what} needs about {need_bytes / GIB:.1f} GiB in {folder}, {free / GIB:.1f} GiB are free; "
                         "give another --workdir or fewer --layers")


def ensure_model(name: str, shape: Shape, workdir: Path, logs: Path) -> tuple[Path, dict[str, Any] | None]:
    """The model folder for this shape; built (and the build measured) unless a matching one exists."""
    folder = workdir / "models" / f"llama-{name}-{shape.layers}L"
    marker = model_marker(name, shape)
    stem = logs / f"build_{folder.name}"
    if (folder / MARKER).is_file() and json.loads((folder / MARKER).read_text()) == marker:
        print(f"model: reusing {folder}", flush=True)
        measure = stem.with_suffix(".measure.json")  # the build's own figures, when this workdir made it
        return folder, json.loads(measure.read_text()) if measure.is_file() else None
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted build, or another shape under the same name
    folder.parent.mkdir(parents=True, exist_ok=True)
    check_disk(folder.parent, 1.05 * 2 * shape.parameters, f"the {name} model folder ({shape.parameters / 1e9:.2f}B params)")
    measure = measured("build", [str(SELF), "_build", "--marker", json.dumps(marker), "--folder", str(folder)],
                       sys.executable, stem)
    if measure["exit_code"] != 0:
        raise SystemExit(f"building {folder} failed (log: {stem.with_suffix('.log')})")
    return folder, measure


# -- calibration ----------------------------------------------------------------------------------
def write_calib_text(workdir: Path, tokenizer, need_tokens: int) -> Path:
    """The tinyshakespeare train split, one sample per line, repeated until it holds ``need_tokens`` tokens."""
    lines = [ln for ln in CALIB_SOURCE.read_text(encoding="utf-8").splitlines() if ln.strip()]
    per_copy = len(tokenizer("\n".join(lines), add_special_tokens=False, verbose=False).input_ids)
    copies = math.ceil((need_tokens + 1) / per_copy)
    path = workdir / f"calib_tinyshakespeare_x{copies}.txt"
    if not path.is_file():
        path.write_text("\n".join(lines * copies) + "\n", encoding="utf-8")
    return path


def calibration_ids(tokenizer, calib: Path, n_samples: int, seq_len: int):
    """The token windows our run builds from its config (same texts, preproc, seed): the peer gets these."""
    from llmc_tpu.data.calib import build_samples, calibration_texts

    return build_samples(calibration_texts("custom_txt", str(calib)), tokenizer, "random_truncate_txt", n_samples,
                         seq_len, SEED)


# -- running and measuring a process ------------------------------------------------------------------
def measured(label: str, target: list[str], python: str, stem: Path) -> dict[str, Any]:
    """Run ``target`` (a script and its arguments, or ``-m module ...``) under _measure.py; its measurement.

    Output goes to ``stem.log``; on failure its last lines are printed.
    """
    log, mjson = stem.with_suffix(".log"), stem.with_suffix(".measure.json")
    mjson.unlink(missing_ok=True)
    cmd = [python, str(MEASURE), "--json", str(mjson), "--", *target]
    print(f"[{label}] {' '.join(target)}\n    log: {log}", flush=True)
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    measure = json.loads(mjson.read_text()) if mjson.is_file() else {"exit_code": proc.returncode, "wall_s": None}
    if measure["exit_code"] != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"[{label}] FAILED (exit {measure['exit_code']}); last lines of the log:", *tail, sep="\n    ", flush=True)
    else:
        print(f"[{label}] done in {measure['wall_s']:.1f} s", flush=True)
    return measure


def fill_measure(row: Row, measure: dict[str, Any]) -> None:
    """The process's figures into the row (peaks: the largest over devices)."""
    row.exit_code, row.process_s = measure["exit_code"], measure.get("wall_s")
    cuda, smi = measure.get("cuda"), measure.get("nvidia_smi")
    if cuda:
        row.gpu_allocated_gib = max(d["max_allocated_gib"] for d in cuda)
        row.gpu_reserved_gib = max(d["max_reserved_gib"] for d in cuda)
    if smi:
        row.gpu_smi_gib = max(smi["peak_used_gib"])
    if "peak_rss_gib" in measure:
        row.rss_gib = measure["peak_rss_gib"]["max"]
    row.details["measure"] = measure


# -- ours -----------------------------------------------------------------------------------------------
def our_config(method: Method, model: Path, calib: Path, n_samples: int, save_path: Path, task: str,
               device_memory_gib: float | None = None) -> dict[str, Any]:
    """The run config a user writes from the template: paths replaced, evaluation off (and the GPU memory cap)."""
    return {"base": {"seed": SEED}, "model": {"path": str(model)},
            "calib": {"name": "custom_txt", "path": str(calib), "preproc": "random_truncate_txt", "n_samples": n_samples,
                      "seq_len": method.seq_len, "bs": method.calib_bs, "seed": SEED},
            "eval": {"eval_pos": []}, "quant": method.quant, "save": {"save_path": str(save_path), **method.save},
            "run": {"task_name": task, **({"device_memory_gib": device_memory_gib} if device_memory_gib else {})}}


def run_ours(row: Row, model: Path, calib: Path, workdir: Path, logs: Path, calib_info: dict[str, Any],
             keep: Path | None = None) -> None:
    """``tpu/llm_quant.py --config`` in a fresh process (torchrun for nproc > 1); outputs deleted afterwards, or
    moved to ``keep``."""
    import yaml

    cap = f"_cap{row.device_memory_gib:g}GiB" if row.device_memory_gib else ""
    stem = logs / f"{row.shape}-{row.layers}L_{row.method}_ours_x{row.nproc}{cap}"
    with tempfile.TemporaryDirectory(prefix="ours_", dir=workdir) as tmp:
        cfg_path, save = Path(tmp) / "config.yml", Path(tmp) / "save"
        cfg = our_config(METHODS[row.method], model, calib, row.samples, save, f"gpu_scale_{stem.name}",
                         row.device_memory_gib)
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        shutil.copy2(cfg_path, stem.with_suffix(".config.yml"))
        if row.method == "awq":  # save_trans writes a full bf16 copy of the model
            params = replace(SHAPES[row.shape], layers=row.layers).parameters
            check_disk(workdir, 1.05 * 2 * params, "AWQ's transformed_model")
        script = ["tpu/llm_quant.py", "--config", str(cfg_path)]
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={row.nproc}"] if row.nproc > 1 else []
        fill_measure(row, measured(f"ours {row.method}", [*launcher, *script], sys.executable, stem))
        row.details["outputs_sha256"] = output_digests(save)
        report_path = save / "report.json"
        if report_path.is_file():
            shutil.copy2(report_path, stem.with_suffix(".report.json"))
            report = json.loads(report_path.read_text())
            read_report(row, report, calib_info)
        elif row.exit_code == 0:
            row.details["warning"] = f"no report.json in {save}"
        if keep is not None and save.is_dir():
            shutil.move(str(save), keep)
    row.details["config"] = cfg


def tensor_differences(first: Path, again: Path) -> dict[str, str]:
    """Per tensor of the safetensors files two runs wrote (relative paths alike), where they differ: how many
    elements, or that one run lacks it."""
    import torch
    from safetensors import safe_open

    out: dict[str, str] = {}
    names = {p.relative_to(first) for p in first.rglob("*.safetensors")} | {p.relative_to(again) for p in again.rglob("*.safetensors")}
    for rel in sorted(names):
        if not (first / rel).is_file() or not (again / rel).is_file():
            out[str(rel)] = "written by one run only"
            continue
        with safe_open(str(first / rel), "pt") as a, safe_open(str(again / rel), "pt") as b:
            keys_a, keys_b = set(a.keys()), set(b.keys())
            for key in sorted(keys_a | keys_b):
                if key not in keys_a or key not in keys_b:
                    out[f"{rel}:{key}"] = "in one run only"
                    continue
                x, y = a.get_tensor(key), b.get_tensor(key)
                if x.shape != y.shape or x.dtype != y.dtype:
                    out[f"{rel}:{key}"] = f"{x.dtype} {tuple(x.shape)} against {y.dtype} {tuple(y.shape)}"
                elif not torch.equal(x, y):
                    out[f"{rel}:{key}"] = f"{int((x.view(-1) != y.view(-1)).sum())} of {x.numel()} elements"
    return out


def run_repeats(row: Row, times: int, model: Path, calib: Path, workdir: Path, logs: Path,
                calib_info: dict[str, Any]) -> None:
    """``row``'s run, then ``times - 1`` more of it: ``details.repeats`` has each one's time and whether it wrote the
    first run's bytes (and, where not, which tensors differ: the first run's outputs are kept until then)."""
    unrun = copy.deepcopy(row)  # each repeat starts from the row as it was before its first run
    with tempfile.TemporaryDirectory(prefix="repeats_", dir=workdir) as tmp:
        first = Path(tmp) / "first"
        run_ours(row, model, calib, workdir, logs, calib_info, keep=first if times > 1 else None)
        for _ in range(times - 1):
            again, kept = copy.deepcopy(unrun), Path(tmp) / "again"
            run_ours(again, model, calib, workdir, logs, calib_info, keep=kept)
            same = again.details.get("outputs_sha256") == row.details.get("outputs_sha256")
            row.details.setdefault("repeats", []).append({
                "exit_code": again.exit_code, "process_s": again.process_s, "quantize_s": again.quantize_s,
                "timings_s": again.details.get("timings_s"), "outputs_sha256": again.details.get("outputs_sha256"),
                "same_bytes_as_first": same, **({} if same else {"tensors_differing": tensor_differences(first, kept)})})
            print(f"repeat of {row.method} ours x{row.nproc}: {again.process_s} s, "
                  f"{'the same bytes' if same else 'OTHER BYTES than the first run'}", flush=True)
            shutil.rmtree(kept, ignore_errors=True)


def output_digests(save: Path) -> dict[str, str]:
    """sha256 of every safetensors file the run wrote: runs with another process count must give the same bytes."""
    import hashlib

    digests = {}
    for path in sorted(save.rglob("*.safetensors")):
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        digests[str(path.relative_to(save))] = h.hexdigest()
    return digests


def read_report(row: Row, report: dict[str, Any], calib_info: dict[str, Any]) -> None:
    """Quantize time, its split, and whether the run built the windows the peer got."""
    timings = report.get("timings_s", {})
    row.quantize_s = timings.get("quantize")
    calib = report.get("data", {}).get("calib", {})
    same = all(calib.get(k) == calib_info.get(k) for k in ("preproc", "n_samples", "seq_len", "seed", "source_tokens"))
    row.details.update(timings_s=timings, peak_memory_gib=report.get("peak_memory_gib", {}), calib=calib,
                       same_windows_as_peer=same, model=report.get("model"))
    if not same:
        print(f"WARNING: our run's calibration ({calib}) differs from the peer's windows ({calib_info})", flush=True)
    if row.quantize_s is not None and row.layers < row.full_layers:
        fixed = timings.get("calibration data", 0.0)  # tokenizing + the embedding pass: once per run, not per block
        row.projected_full_s = fixed + (row.quantize_s - fixed) / row.layers * row.full_layers


# -- the peer: llm-compressor -------------------------------------------------------------------------
def peer_importable(python: str) -> str | None:
    """None when ``python`` can import llmcompressor, else why not."""
    probe = subprocess.run([python, "-c", "import llmcompressor"], capture_output=True, text=True)
    return None if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["import failed"])[-1]


# What each tool's process imports, run once before the timed processes: the bytecode Python caches on a first
# import (site-packages installed with --no-compile, a fresh checkout) is then there for both, as on any second run
WARM_IMPORTS = {
    "ours": "import llmc_tpu.cli, llmc_tpu.pipeline; from transformers import AutoTokenizer, LlamaForCausalLM",
    "llm-compressor": "import datasets; from transformers import AutoModelForCausalLM; from llmcompressor import oneshot; "
                      "from llmcompressor.modifiers.awq import AWQModifier; from llmcompressor.modifiers.quantization "
                      "import GPTQModifier",
}


def warm_imports(tool: str, python: str) -> dict[str, Any]:
    """Import what ``tool``'s process imports, untimed by the rows; its wall time and exit code for the JSON."""
    start = time.perf_counter()
    proc = subprocess.run([python, "-c", WARM_IMPORTS[tool]], cwd=ROOT, capture_output=True, text=True)
    return {"python": python, "wall_s": round(time.perf_counter() - start, 3), "exit_code": proc.returncode,
            **({"stderr_tail": proc.stderr[-500:]} if proc.returncode else {})}


def peer_recipe(method: str) -> list:
    """llm-compressor's modifiers for W4 asymmetric group 64 (its defaults otherwise; lm_head kept)."""
    import awq_vs_reference
    import gptq_vs_reference

    from llmc_tpu.tpu.rtn import TpuWeightFormat

    ref = awq_vs_reference.import_reference()  # also skips pin_memory where there is no accelerator
    weights = awq_vs_reference.reference_args(ref, TpuWeightFormat(4, GROUP_SIZE, symmetric=False))
    scheme = {"group_0": ref["QuantizationScheme"](targets=["Linear"], weights=weights)}
    if method == "gptq":
        gptq = gptq_vs_reference.import_reference()["GPTQModifier"]
        return [gptq(config_groups=scheme, ignore=["lm_head"], block_size=128, dampening_frac=0.01, actorder="static")]
    return [ref["AWQModifier"](), ref["QuantizationModifier"](config_groups=scheme, ignore=["lm_head"])]


def peer_main(argv: list[str]) -> int:
    """``_peer``: load the folder as an llm-compressor user does, then time ``oneshot`` on the given token ids."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(prog="gpu_scale.py _peer")
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="torch.save'd [n_samples, seq_len] token ids")
    ap.add_argument("--method", choices=list(METHODS), required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    recipe = peer_recipe(args.method)
    from llmcompressor import oneshot

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_s = time.perf_counter() - start
    ids = torch.load(args.ids)
    seen: list[torch.Tensor] = []  # what reached the embedding: it must be exactly our windows
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().cpu()))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=args.batch_size,
            pipeline="sequential")
    oneshot_s = time.perf_counter() - start
    hook.remove()
    same = bool(seen) and torch.equal(torch.unique(torch.cat(seen), dim=0), torch.unique(ids, dim=0))
    args.out.write_text(json.dumps({"load_s": round(load_s, 3), "oneshot_s": round(oneshot_s, 3), "fed_our_ids": same,
                                    "batch_size": args.batch_size, "recipe": [repr(m) for m in recipe],
                                    "versions": package_versions(PEER_VERSIONS)}, indent=2) + "\n")
    print(f"oneshot {oneshot_s:.1f} s (load {load_s:.1f} s); fed exactly our windows: {same}", flush=True)
    return 0


def run_peer(row: Row, model: Path, ids_path: Path, logs: Path, python: str, batch_size: int) -> None:
    stem = logs / f"{row.shape}-{row.layers}L_{row.method}_llm-compressor"
    out = stem.with_suffix(".peer.json")
    out.unlink(missing_ok=True)
    target = [str(SELF), "_peer", "--model", str(model), "--ids", str(ids_path), "--method", row.method,
              "--batch-size", str(batch_size), "--out", str(out)]
    fill_measure(row, measured(f"llm-compressor {row.method}", target, python, stem))
    if out.is_file():
        peer = json.loads(out.read_text())
        row.quantize_s = peer["oneshot_s"]
        row.details["peer"] = peer
        if not peer["fed_our_ids"]:
            print("WARNING: llm-compressor was not fed exactly our calibration windows", flush=True)
        if row.layers < row.full_layers:
            row.projected_full_s = row.quantize_s / row.layers * row.full_layers


# -- the result -----------------------------------------------------------------------------------------
def ours_one_process(row: Row, rows: list[Row]) -> Row | None:
    """Our one-process, uncapped row with a quantize time on the same shape, layers, method and samples."""
    return next((r for r in rows if r.tool == "ours" and r.nproc == 1 and r.quantize_s and not r.device_memory_gib and
                 (r.shape, r.layers, r.method, r.samples) == (row.shape, row.layers, row.method, row.samples)), None)


def ratio(row: Row, rows: list[Row]) -> float | None:
    """Peer oneshot time / our quantize time on the same shape, layers, method and samples (one process each)."""
    if row.tool == "ours" or row.quantize_s is None:
        return None
    ours = ours_one_process(row, rows)
    return row.quantize_s / ours.quantize_s if ours else None


def versus_one_process(row: Row, rows: list[Row]) -> str:
    """For a torchrun row: one process's quantize time / this row's, and whether the outputs are the same bytes."""
    if row.tool != "ours" or row.nproc == 1 or not row.quantize_s:
        return "-"
    one = ours_one_process(row, rows)
    if one is None:
        return "-"
    mine, theirs = row.details.get("outputs_sha256"), one.details.get("outputs_sha256")
    same = "no outputs hashed" if not (mine and theirs) else "same bytes" if mine == theirs else "OUTPUTS DIFFER"
    return f"{one.quantize_s / row.quantize_s:.2f}x, {same}"


def table(rows: list[Row]) -> str:
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| shape | method | tool | process wall s | quantize / oneshot s | peak GPU GiB alloc / reserved / nvidia-smi "
             "| peak host RSS GiB | peer / ours | one process / torchrun |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        shape = r.shape if r.layers == r.full_layers else f"{r.shape} ({r.layers} of {r.full_layers} layers)"
        tool = r.tool if r.nproc == 1 else f"{r.tool} (torchrun x{r.nproc})"
        tool += f", GPU capped at {r.device_memory_gib:g} GiB" if r.device_memory_gib else ""
        quant = f(r.quantize_s) if r.exit_code == 0 else f"failed (exit {r.exit_code})"
        gpu = f"{f(r.gpu_allocated_gib, 2)} / {f(r.gpu_reserved_gib, 2)} / {f(r.gpu_smi_gib, 2)}"
        rat = ratio(r, rows)
        lines.append(f"| {shape} | {r.method} | {tool} | {f(r.process_s)} | {quant} | {gpu} | {f(r.rss_gib, 2)} | "
                     f"{'-' if rat is None else f'{rat:.2f}x'} | {versus_one_process(r, rows)} |")
    return "\n".join(lines)


def projections(rows: list[Row]) -> list[str]:
    """One line per --layers row: its quantize time scaled to the shape's full layer count."""
    minutes = lambda s: f" ({s / 60:.1f} min)" if s >= 60 else ""  # noqa: E731
    return [f"projected quantize time for all {r.full_layers} layers of {r.shape}: {r.tool} {r.method} "
            f"{r.projected_full_s:.0f} s{minutes(r.projected_full_s)}, from {r.layers} layers"
            for r in rows if r.projected_full_s is not None]


def environment(peer_python: str) -> dict[str, Any]:
    import torch

    return {"gpu": nvidia_smi("name"), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "git_commit": git_commit(ROOT, "llmc_tpu"),
            "package_versions": package_versions(PEER_VERSIONS), "peer_python": peer_python,
            "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def merged_rows(out: Path, rows: list[Row]) -> list[Row]:
    """Rows of earlier runs in ``out`` that this run did not measure again, then this run's."""
    if not out.is_file():
        return rows
    old = json.loads(out.read_text()).get("rows", [])
    fresh = {r.key for r in rows}
    kept = [Row(**r) for r in old if Row(**r).key not in fresh]
    return kept + rows


# -- main ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(line for line in __doc__.splitlines() if line.startswith("    python ")) +
               "\n\nSee the module docstring (and benchmarks/README.md) for what each figure is.")
    ap.add_argument("--shape", choices=list(SHAPES), default="7b",
                    help="7b: Llama-2-7B (hidden 4096, 32 layers); 70b: Llama-2-70B (hidden 8192, GQA 64/8, 80 layers; "
                         "138 GB in full, so use --layers); tiny: hidden 64, 4 layers, for a CPU smoke run; host: hidden 2048, "
                         "8 layers (1.1 GB), peak host memory of a CPU run against the model's size (default 7b)")
    ap.add_argument("--layers", type=int, help="build and run only this many decoder layers; the table's projection "
                                               "scales the quantize time to the shape's full layer count")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                    help="awq: AWQ W4 asym g64 on 128 x 512; gptq: GPTQ.yml's GPTQ on 128 x 2048 (default: both)")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows (default 128, as the templates)")
    tools = ap.add_mutually_exclusive_group()
    tools.add_argument("--no-peer", action="store_true", help="run ours only (no llm-compressor)")
    tools.add_argument("--peer-only", action="store_true", help="run llm-compressor only (ours from an earlier run in "
                                                                "--out gives the ratio)")
    tools.add_argument("--build-only", action="store_true", help="build (or check) the model folder and stop")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run ours this many times per row; details.repeats says whether each later run wrote the first "
                         "run's bytes and, where not, which tensors differ (default 1)")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1],
                    help="processes for ours: N > 1 launches torchrun --standalone --nproc-per-node N; several values "
                         "run ours once per value, and the table compares each torchrun run with one process (time "
                         "and output bytes); llm-compressor runs in one process (default 1)")
    ap.add_argument("--device-memory-gib", type=float,
                    help="ours: run.device_memory_gib, PyTorch's allocator capped at this many GiB per process (shows "
                         "a run fitting a smaller GPU: the inputs go to host memory when they do not fit a quarter)")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="the interpreter that has llmcompressor (its own venv, see benchmarks/README.md); default: this one")
    ap.add_argument("--peer-bs", type=int, default=16, help="llm-compressor's calibration batch size (default 16)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help=f"model folders, calibration text, logs and temporary outputs (default {DEFAULT_WORKDIR})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results; earlier rows in it are kept "
                                                                  "(default benchmarks/results/gpu_scale.json)")
    args = ap.parse_args(argv)
    full = SHAPES[args.shape].layers
    if args.layers is not None and not 1 <= args.layers <= full:
        ap.error(f"--layers must be between 1 and {full} for {args.shape}")
    if min(args.nproc) < 1 or args.samples < 1 or args.repeat < 1:
        ap.error("--nproc, --samples and --repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_build"]:
        return build_main(argv[1:])
    if argv[:1] == ["_peer"]:
        return peer_main(argv[1:])
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    full = SHAPES[args.shape]
    shape = replace(full, layers=args.layers or full.layers)
    workdir, logs = args.workdir.resolve(), args.workdir.resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    model, build = ensure_model(args.shape, shape, workdir, logs)
    if args.build_only:
        return 0
    peer_skip = "--no-peer" if args.no_peer else peer_importable(args.peer_python)
    if peer_skip and not args.no_peer:
        print(f"llm-compressor: skipped, not importable by {args.peer_python} ({peer_skip}); give --peer-python of a "
              "venv that has it (benchmarks/README.md) or --no-peer", flush=True)
    warmed = {} if args.peer_only else {"ours": warm_imports("ours", sys.executable)}
    if not peer_skip:
        warmed["llm-compressor"] = warm_imports("llm-compressor", args.peer_python)
    tokenizer = AutoTokenizer.from_pretrained(model)
    calib = write_calib_text(workdir, tokenizer, args.samples * max(METHODS[m].seq_len for m in args.methods))
    rows: list[Row] = []
    for name in args.methods:
        method = METHODS[name]
        ids, calib_info = calibration_ids(tokenizer, calib, args.samples, method.seq_len)
        common = dict(shape=args.shape, layers=shape.layers, full_layers=full.layers, method=name,
                      samples=args.samples, seq_len=method.seq_len,
                      details={"calibration": {**calib_info, "path": str(calib)}, "template": method.template})
        if not args.peer_only:
            for nproc in args.nproc:
                rows.append(Row(tool="ours", nproc=nproc, device_memory_gib=args.device_memory_gib, **copy.deepcopy(common)))
                run_repeats(rows[-1], args.repeat, model, calib, workdir, logs, calib_info)
        if not peer_skip:
            ids_path = workdir / f"ids_{name}_{args.samples}x{method.seq_len}.pt"
            torch.save(ids, ids_path)
            rows.append(Row(tool="llm-compressor", nproc=1, **copy.deepcopy(common)))
            run_peer(rows[-1], model, ids_path, logs, args.peer_python, args.peer_bs)
    env = environment(args.peer_python)
    for r in rows:
        r.details["environment"] = env
        r.details["imports_warmed"] = warmed.get(r.tool)
    all_rows = merged_rows(args.out, rows)
    text = table(all_rows)
    print("\n" + text)
    for line in projections(all_rows):
        print(line)
    write_result({"benchmark": "gpu_scale: llmc_tpu quantize vs llm-compressor oneshot at real Llama shapes, random "
                               "bf16 weights, W4 asym g64",
                  "command": " ".join([Path(sys.executable).name, *sys.argv]), "environment": env,
                  "model": {"folder": str(model), **model_marker(args.shape, shape), "build": build},
                  "columns": {"process_s": "wall time of the whole process (load, calibration, quantize, save)",
                              "quantize_s": "ours: report timings_s.quantize; llm-compressor: its oneshot call",
                              "gpu_*_gib": "peak over the process (max over GPUs): CUDA allocated / reserved, "
                                           "nvidia-smi memory.used polled every 0.5 s",
                              "rss_gib": "ru_maxrss: the larger of the process's and its largest child's",
                              "projected_full_s": "ours: calibration data + (quantize - calibration data) / layers x "
                                                  "full layers; llm-compressor: oneshot / layers x full layers"},
                  "rows": [asdict(r) for r in all_rows], "table": text}, args.out)
    return 0 if all(r.exit_code == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
