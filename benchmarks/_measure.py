#!/usr/bin/env python3
"""Run a Python program as ``python`` would and write what it cost: wall time, exit code, peak memory.

    python benchmarks/_measure.py --json OUT.json -- tpu/llm_quant.py --config CFG.yml
    python benchmarks/_measure.py --json OUT.json -- -m torch.distributed.run --nproc-per-node 2 tpu/llm_quant.py ...

The target runs in this process (``runpy``, as ``__main__``, with ``sys.argv`` set as for a direct run), so its
own peaks can be read when it ends, however it ends (normal return, ``SystemExit``, an exception). OUT.json holds:

- ``wall_s``, ``exit_code``, ``argv``;
- ``peak_rss_gib``: ``getrusage`` ``ru_maxrss`` of this process (``self``) and of its largest waited-for child
  process (``children``, e.g. one torchrun worker; not a sum over children), and ``max`` of the two: the peak of
  one process (not their sum: a forked helper's ``ru_maxrss`` counts the pages it shares with this process);
- ``cuda``: when the target initialized CUDA, ``torch.cuda.max_memory_allocated()`` / ``max_memory_reserved()`` of
  every visible device, in GiB (null otherwise, e.g. under torchrun, whose workers are other processes);
- ``nvidia_smi``: ``memory.used`` of every GPU polled every 0.5 s by a thread of this process while the target runs
  (all processes on the GPU, CUDA contexts included): the peak and the value before the start, in GiB; null
  without ``nvidia-smi``.
"""

from __future__ import annotations

import argparse
import json
import resource
import runpy
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

GIB = 2**30
POLL_S = 0.5


def nvidia_smi(field: str) -> list[str] | None:
    """One ``--query-gpu`` field, one value per GPU; None without a working ``nvidia-smi``."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def _used_mib() -> list[float] | None:
    values = nvidia_smi("memory.used")
    try:
        return None if values is None else [float(v) for v in values]
    except ValueError:  # "[N/A]" on some devices
        return None


class GpuPoller:
    """Peak ``memory.used`` per GPU, polled in a daemon thread from ``start()`` to ``stop()``."""

    def __init__(self) -> None:
        self.baseline = _used_mib()
        self.peak = list(self.baseline) if self.baseline else None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            used = _used_mib()
            if used is not None and self.peak is not None and len(used) == len(self.peak):
                self.peak = [max(p, u) for p, u in zip(self.peak, used)]
                self.samples += 1

    def start(self) -> None:
        if self.baseline is not None:
            self._thread.start()

    def stop(self) -> dict[str, Any] | None:
        if self.baseline is None:
            return None
        self._stop.set()
        self._thread.join()
        return {"peak_used_gib": [round(p * 2**20 / GIB, 3) for p in self.peak],
                "before_start_gib": [round(b * 2**20 / GIB, 3) for b in self.baseline], "samples": self.samples,
                "interval_s": POLL_S}


def cuda_peaks() -> list[dict[str, Any]] | None:
    """Peak allocated / reserved memory of every visible device, when the target initialized CUDA."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return [{"device": i, "name": torch.cuda.get_device_name(i),
             "max_allocated_gib": round(torch.cuda.max_memory_allocated(i) / GIB, 3),
             "max_reserved_gib": round(torch.cuda.max_memory_reserved(i) / GIB, 3)}
            for i in range(torch.cuda.device_count())]


def peak_rss() -> dict[str, float]:
    """``ru_maxrss`` (KiB on Linux) of this process and of its largest finished child, in GiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB
    return {"self": round(own, 3), "children": round(children, 3), "max": round(max(own, children), 3)}


def run_target(target: list[str]) -> int:
    """Run ``script.py args`` or ``-m module args`` as ``__main__``; its exit code."""
    if target[0] == "-m":
        module, args = target[1], target[2:]
        sys.argv = [module, *args]
        run = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        script, args = target[0], target[1:]
        sys.argv = [script, *args]
        sys.path.insert(0, str(Path(script).resolve().parent))  # as `python script.py` puts the script's folder first
        run = lambda: runpy.run_path(script, run_name="__main__")  # noqa: E731
    try:
        run()
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)  # sys.exit("message") prints the message and exits 1
        return 1
    except BaseException:  # noqa: BLE001  (KeyboardInterrupt too: the measurement is still written)
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: _measure.py --json OUT.json -- script.py [args...] | -m module [args...]")
    split = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, type=Path, help="where the measurement goes")
    args = ap.parse_args(argv[:split])
    target = argv[split + 1:]
    if not target or target == ["-m"]:
        raise SystemExit("_measure.py: nothing to run after --")
    poller = GpuPoller()
    poller.start()
    start = time.perf_counter()
    code = run_target(target)
    wall = time.perf_counter() - start
    sys.stdout.flush()
    result = {"argv": target, "wall_s": round(wall, 3), "exit_code": code, "peak_rss_gib": peak_rss(),
              "cuda": cuda_peaks(), "nvidia_smi": poller.stop()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
