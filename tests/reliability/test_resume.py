"""Kill a run with SIGKILL in the middle, resume it, and get byte-identical outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from tiny_models import TEXT, make_tiny_model

REPO = Path(__file__).resolve().parents[2]


def config(model: Path, data: Path, save: Path, method: str) -> dict:
    return {"model": {"path": str(model), "torch_dtype": "float32"},
            "calib": {"name": "custom_txt", "path": str(data), "n_samples": 8, "seq_len": 64, "bs": 2},
            "eval": {"name": "custom_ppl", "path": str(data), "seq_len": 64, "bs": 4,
                     "eval_pos": ["pretrain", "fake_quant"], "eval_token_consist": True},
            "quant": {"method": method, "quant_out": True}, "save": {"save_path": str(save), "save_fake": True}}


def start(cfg_file: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmc_tpu", "-q", "quantize", "--config", str(cfg_file), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("method", ["Awq", "GPTQ"])  # checkpoints: AWQ's changed weights; GPTQ's codes alone
def test_sigkill_then_resume_is_bit_identical(method, tmp_path):
    model = make_tiny_model(tmp_path / "m", "llama", layers=6, dtype=torch_float32())
    data = tmp_path / "data.txt"
    data.write_text(TEXT.replace(". ", ".\n"), encoding="utf-8")
    differences = whole_against_killed_and_resumed(tmp_path / "first", model, data, method)
    if differences:
        # This CPU's float results differ between processes about once in 20 to 60 runs (the float model's pretrain
        # PPL on the same data: 700.94121 or 700.94139; not seeded, not the thread count; the first module whose
        # output differed was the rotary embedding). A run compares three processes, so the whole comparison is
        # made a second time: a resume that loses or repeats work fails both.
        warnings.warn(f"first attempt differed ({', '.join(differences)}); once more with fresh processes",
                      stacklevel=1)
        differences = whole_against_killed_and_resumed(tmp_path / "second", model, data, method)
    assert not differences


def whole_against_killed_and_resumed(work: Path, model: Path, data: Path, method: str) -> list[str]:
    """Run once without interruption and once killed after two blocks then resumed; what differs between them."""
    work.mkdir()
    runs = {}
    for name in ("whole", "killed"):
        cfg_file = work / f"{name}.yml"
        cfg_file.write_text(yaml.safe_dump(config(model, data, work / name, method)))
        runs[name] = cfg_file

    whole = start(runs["whole"])
    assert whole.wait(timeout=600) == 0, whole.stderr.read()

    killed = start(runs["killed"])
    state = work / ".killed.partial" / "_resume" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text()).get("done_blocks", 0) >= 2:
            break
        assert killed.poll() is None, "the run finished before it could be killed"
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (work / "killed").exists()  # nothing that looks complete

    again = start(runs["killed"])
    _, err = again.communicate(timeout=600)
    assert again.returncode != 0 and "pass --resume" in err  # never silently restarts over the checkpoints
    resumed = start(runs["killed"], "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert not (work / ".killed.partial").exists()  # checkpoints removed on success

    a, b = work / "whole", work / "killed"
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")
                   and p.name not in ("report.json", "manifest.json"))
    assert any(f.endswith("model.safetensors") for f in files)
    differences = [rel for rel in files if (a / rel).read_bytes() != (b / rel).read_bytes()]
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    differences += [key for key in ("ppl", "token_consistency") if ra[key] != rb[key]]
    if ra["method"]["blocks"] != rb["method"]["blocks"]:
        differences.append("report: method.blocks")
    return differences


def torch_float32():
    import torch

    return torch.float32
