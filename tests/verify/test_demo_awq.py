"""The embedded demo: AWQ beats RTN under the TPU's own rounding, and TPU-MLIR agrees code for code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmc_tpu.config import load_config
from llmc_tpu.pipeline import Quantizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.chdir(REPO)
    out = {}
    for name in ("demo_rtn", "demo_awq"):
        cfg = load_config(REPO / "configs" / "LLM" / f"{name}.yml")
        cfg.save.save_path = str(tmp_path_factory.mktemp(name) / "out")
        out[name] = (Quantizer(cfg, progress=False).run(), Path(cfg.save.save_path))
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_awq_beats_rtn_on_the_demo(demo_runs):
    rtn = demo_runs["demo_rtn"][0].ppl
    awq = demo_runs["demo_awq"][0].ppl
    assert rtn["pretrain"]["test"] == pytest.approx(awq["pretrain"]["test"])
    assert awq["fake_quant"]["test"] < rtn["fake_quant"]["test"]
    assert rtn["fake_quant"]["test"] > rtn["pretrain"]["test"]


@pytest.mark.tpu_mlir
def test_tpu_mlir_reproduces_the_awq_codes(demo_runs):
    save = demo_runs["demo_awq"][1]
    run = subprocess.run([sys.executable, "-m", "llmc_tpu", "verify", str(save)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all 28 Linears match TPU-MLIR" in run.stdout
