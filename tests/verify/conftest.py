"""Fixtures for the verify tests: the TPU-MLIR gate, tiny models, and one shared cache of compiles."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model

from llmc_tpu.tpu.rtn import TpuWeightFormat
from llmc_tpu.verify import VerifyError, VerifyResult, find_tpu_mlir, verify

SEQ_LEN = 64  # the lowered weights do not depend on it

# name -> make_tiny_model arguments. "npu" has k/v_proj out-features 32 and gate/up 288:
# on bm1684x (NPU_NUM 64) k/v keep no integer rows and gate/up keep 256 of 288; on bm1688 (32) all do.
MODELS: dict[str, dict] = {
    "llama": {"family": "llama"},
    "qwen2": {"family": "qwen2"},
    "qwen3": {"family": "qwen3"},
    "npu": {"family": "llama", "heads": 4, "kv_heads": 1, "intermediate": 288, "seed": 1},
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "tpu_mlir: needs TPU-MLIR (tools/install_tpu_mlir.sh); skipped without it, "
                                       "but a failure when CI=true")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip TPU-MLIR tests when it is missing, except in CI, where a missing TPU-MLIR is a failure."""
    if item.get_closest_marker("tpu_mlir") is None:
        return
    try:
        find_tpu_mlir()
    except VerifyError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and TPU-MLIR is not usable (CI must run tools/install_tpu_mlir.sh first): {exc}",
                        pytrace=False)
        pytest.skip(f"TPU-MLIR not installed: {exc}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[[str, torch.dtype], Path]:
    """Build (once) the named tiny model saved in the given dtype."""
    built: dict[tuple[str, torch.dtype], Path] = {}

    def get(name: str, dtype: torch.dtype = torch.bfloat16) -> Path:
        if (name, dtype) not in built:
            folder = tmp_path_factory.mktemp(f"{name}_{str(dtype).split('.')[-1]}")
            built[name, dtype] = make_tiny_model(folder, dtype=dtype, **MODELS[name])
        return built[name, dtype]

    return get


@pytest.fixture(scope="session")
def compiled(tiny_model, tmp_path_factory) -> Callable[[str, TpuWeightFormat], tuple[Path, VerifyResult]]:
    """Verify (compile once per model and format) and return the model folder with the result."""
    done: dict[tuple[str, TpuWeightFormat], tuple[Path, VerifyResult]] = {}

    def get(name: str, fmt: TpuWeightFormat) -> tuple[Path, VerifyResult]:
        if (name, fmt) not in done:
            model = tiny_model(name, fmt.torch_scale_dtype)
            done[name, fmt] = model, verify(model, fmt, SEQ_LEN, tmp_path_factory.mktemp("verify"))
        return done[name, fmt]

    return get
