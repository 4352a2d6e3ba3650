"""Find the TPU-MLIR install built by tools/install_tpu_mlir.sh and run its tools in their own environment.

TPU-MLIR lives in its own Python 3.10 venv. Its console scripts (``venv/bin/llm_convert.py``,
``model_deploy.py``, ...) import ``tpu_mlir``, whose ``__init__`` puts the package's tools,
libraries and Python paths on PATH / LD_LIBRARY_PATH / PYTHONPATH itself. What it needs from
us: that venv's ``bin`` first on PATH, because llm_convert starts ``model_deploy.py`` through
GNU parallel and those scripts run with ``#!/usr/bin/env python3``; and none of our own
Python variables leaking in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

TPU_MLIR_VERSION = "1.30.2"
HOME_ENV = "LLMC_TPU_MLIR_HOME"
INSTALL_HINT = "run tools/install_tpu_mlir.sh (it builds TPU-MLIR's Python 3.10 venv; about 3 minutes)"
_PYTHON_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV", "CONDA_PREFIX")


class VerifyError(RuntimeError):
    """TPU-MLIR is missing or failed; the message says what to do."""


def tpu_mlir_home() -> Path:
    """Where the install lives: $LLMC_TPU_MLIR_HOME or ~/.cache/llmc_tpu/tpu-mlir-1.30.2."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmc_tpu" / f"tpu-mlir-{TPU_MLIR_VERSION}"


@dataclass(frozen=True)
class TpuMlirEnv:
    """A working TPU-MLIR install: its venv and the environment its tools need."""

    home: Path

    @property
    def venv(self) -> Path:
        return self.home / "venv"

    @property
    def bin_dir(self) -> Path:
        return self.venv / "bin"

    def tool(self, name: str) -> Path:
        """Path of one of the wheel's console scripts, e.g. ``llm_convert.py``."""
        return self.bin_dir / name

    def environ(self) -> dict[str, str]:
        """Our environment with the venv activated and our Python variables removed."""
        env = {k: v for k, v in os.environ.items() if k not in _PYTHON_VARS}
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", os.defpath)])
        env["VIRTUAL_ENV"] = str(self.venv)
        return env

    def run(self, args: list[str], cwd: Path, log: Path, timeout_s: float | None = None) -> int:
        """Run a tool with stdout and stderr going to ``log``; return its exit code."""
        with open(log, "w", encoding="utf-8") as f:
            try:
                proc = subprocess.run(args, cwd=cwd, env=self.environ(), stdin=subprocess.DEVNULL,
                                      stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
            except subprocess.TimeoutExpired:
                f.write(f"\n[llmc_tpu] timed out after {timeout_s} s\n")
                return 124
        return proc.returncode


def find_tpu_mlir(home: Path | None = None) -> TpuMlirEnv:
    """The install at ``home`` (default: tpu_mlir_home()), or VerifyError saying how to get one."""
    home = home or tpu_mlir_home()
    env = TpuMlirEnv(home)
    if not (home / ".complete").is_file() or not env.tool("llm_convert.py").is_file():
        raise VerifyError(f"TPU-MLIR {TPU_MLIR_VERSION} is not installed in {home} (set {HOME_ENV} to use "
                          f"another place): {INSTALL_HINT}")
    if shutil.which("parallel") is None:
        raise VerifyError(f"GNU parallel is missing (llm_convert.py runs its compile jobs through it): {INSTALL_HINT}")
    return env
