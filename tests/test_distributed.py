"""torchrun: the calibration samples shared over processes, sums in a fixed order, the codes of one process."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from llmc_tpu.engine.distributed import PARTS, OrderedSum, Ranks, Shard, micro_batches, parts, share_cpu_threads

REPO = Path(__file__).resolve().parent.parent


def test_micro_batches_never_straddle_a_part():
    for n, size in [(128, 64), (128, 5), (100, 13), (5, 4), (3, 1)]:
        batches = micro_batches(n, size)
        assert [i for b in batches for i in b] == list(range(n))  # every sample once, in order
        assert all(len(b) <= size for b in batches)
        owner = {i: p for p, part in enumerate(parts(n)) for i in part}
        assert all(len({owner[i] for i in b}) == 1 for b in batches)


def test_shares_are_whole_parts_in_order():
    n = 100
    for world in (1, 2, 4, 8):
        shares = [Shard(n, Ranks(r, world)).mine for r in range(world)]
        assert [i for s in shares for i in s] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= PARTS // world  # balanced


def _sequential(values: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(values[0])
    for v in values:
        total += v
    return total


def test_one_process_sums_parts_then_pairs():
    """The fixed order is a re-derivation: each part summed in order, then ((p0+p1)+(p2+p3))+((p4+p5)+(p6+p7))."""
    g = torch.Generator().manual_seed(0)
    for n in (37, 8, 5):
        values = [torch.randn(16, 16, generator=g) * 10 ** torch.randint(-3, 4, (1,), generator=g).item()
                  for _ in range(n)]
        acc = OrderedSum(Shard(n), (16, 16), torch.float32, "cpu")
        for v in values:
            acc.slot().add_(v)
        level = [_sequential([values[i] for i in part]) if len(part) else None for part in parts(n)]
        while len(level) > 1:
            pairs = zip(level[::2], level[1::2])
            level = [a if b is None else b if a is None else a + b for a, b in pairs]
        assert torch.equal(acc.result(), level[0])


def _group_sums(values: torch.Tensor, per_product: int, product) -> torch.Tensor:
    """``add_samples``'s order, re-derived: per part, ``product`` of ``per_product`` samples at a time from the part's
    start, added in order; then the parts pairwise up the tree."""
    level = []
    for part in parts(values.shape[0]):
        groups = [values[a:min(a + per_product, part.stop)] for a in range(part.start, part.stop, per_product)]
        level.append(_sequential([product(grp) for grp in groups]) if groups else None)
    while len(level) > 1:
        level = [a if b is None else b if a is None else a + b for a, b in zip(level[::2], level[1::2])]
    return level[0]


def _gram_product(rows: torch.Tensor) -> torch.Tensor:
    flat = rows.reshape(-1, rows.shape[-1])
    return flat.T @ flat


@pytest.mark.parametrize("per_product", [1, 3, 8])
def test_grouped_products_do_not_depend_on_the_batches(per_product):
    """``add_samples`` sums one product per group of samples counted from each part's start: the re-derived order,
    bit for bit, whatever batches the samples come in (a batch may end inside a group: its samples wait)."""
    g = torch.Generator().manual_seed(5)
    n = 37
    scales = 10.0 ** torch.randint(-3, 4, (n, 1, 1), generator=g)
    values = torch.randn(n, 6, 12, generator=g) * scales
    expected = _group_sums(values, per_product, _gram_product)
    for size in (1, 2, 5, n):
        acc = OrderedSum(Shard(n), (12, 12), torch.float32, "cpu")
        for r in micro_batches(n, size):
            acc.add_samples(values[r.start:r.stop], _gram_product, per_product)
        assert torch.equal(acc.result(), expected), size
    unfinished = OrderedSum(Shard(n), (12, 12), torch.float32, "cpu")
    unfinished.add_samples(values[:1], _gram_product, 2)
    with pytest.raises(RuntimeError, match="lacks samples"):
        unfinished.result()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ordered_sum_worker(rank: int, world: int, port: int, values: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shard = Shard(values.shape[0], Ranks(rank, world))
        acc = OrderedSum(shard, tuple(values.shape[1:]), values.dtype, "cpu")
        for i in shard.mine:
            acc.slot().add_(values[i])
        total = acc.result()
        grouped = OrderedSum(shard, (values.shape[-1],) * 2, values.dtype, "cpu")
        for r in micro_batches(values.shape[0], 2):
            if r.start in shard.mine:
                grouped.add_samples(values[r.start:r.stop], _gram_product, 3)
        grouped_total = grouped.result()
        rows = shard.gather(values[shard.mine.start:shard.mine.stop, 0])
        if rank == 0:
            torch.save({"total": total, "grouped": grouped_total, "rows": rows}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_processes_get_the_one_process_sum_bit_for_bit(world, tmp_path):
    g = torch.Generator().manual_seed(1)
    n = 45
    scales = 10.0 ** torch.randint(-4, 5, (n, 1, 1), generator=g)
    values = torch.randn(n, 24, 24, generator=g) * scales  # magnitudes far apart: order-sensitive in float32
    one = OrderedSum(Shard(n), (24, 24), torch.float32, "cpu")
    for v in values:
        one.slot().add_(v)
    expected = one.result()
    out = tmp_path / "total.pt"
    mp.spawn(_ordered_sum_worker, args=(world, _free_port(), values, str(out)), nprocs=world, join=True)
    got = torch.load(out)
    assert torch.equal(got["total"], expected)
    assert torch.equal(got["grouped"], _group_sums(values, 3, _gram_product))  # add_samples: the same, bit for bit
    assert torch.equal(got["rows"], values[:, 0])  # gathered in sample order
    assert not torch.equal(_sequential(list(values)), expected)  # the order matters for these values


NATURAL_ORDER = {"actorder": False, "static_groups": False}  # with its default refine sweeps (rows per process)


def _config(model: Path, calib: Path, save: Path, method: str) -> dict:
    special = {"special": NATURAL_ORDER} if method == "GPTQ natural order" else {}
    method = method.split()[0]
    return {
        "model": {"path": str(model)},
        "calib": {"name": "custom_txt", "path": str(calib), "n_samples": 16, "seq_len": 64, "bs": -1},
        "eval": {"eval_pos": []},
        "quant": {"method": method, "quant_out": True, **special},
        "save": {"save_path": str(save), **({"save_trans": True} if method == "Awq" else {})},
        "run": {"device": "cpu"},
    }


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("method", ["GPTQ", "GPTQ natural order", "Awq"])
def test_torchrun_two_processes_write_the_one_process_outputs(method, tiny_llama, eval_txt, tmp_path):
    """``torchrun --nproc-per-node 2 tpu/llm_quant.py`` (gloo on the CPU) against one process: the same bytes."""
    folders = {}
    for procs in (1, 2):
        save = tmp_path / f"out{procs}"
        cfg = tmp_path / f"cfg{procs}.yml"
        cfg.write_text(yaml.safe_dump(_config(tiny_llama, eval_txt, save, method)))
        entry = [str(REPO / "tpu" / "llm_quant.py"), "-q", "--config", str(cfg)]
        cmd = [sys.executable, *entry] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *entry]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count("outputs:") == 1  # one summary: rank 0's
        report = json.loads((save / "report.json").read_text())
        calib = report["data"]["calib"]
        if method == "GPTQ natural order":  # each process refined its rows
            assert {s.get("refine_sweeps") for b in report["method"]["blocks"] for s in b["gptq"]} == {3}
        assert calib.get("samples_per_process", 16) == 16 // procs  # rank 0 held half of the samples
        folders[procs] = save / ("gptq_tpu_model" if method.startswith("GPTQ") else "transformed_model")
    assert _digests(folders[1]) and _digests(folders[1]) == _digests(folders[2])


def test_torchrun_refuses_what_runs_in_one_process(tiny_llama, eval_txt, tmp_path, monkeypatch):
    from llmc_tpu.config import parse_config
    from llmc_tpu.pipeline import PipelineError, check_distributed

    cfg = parse_config(_config(tiny_llama, eval_txt, tmp_path / "x", "SignRound"))
    with pytest.raises(PipelineError, match="SignRound's optimizer runs in one process"):
        check_distributed(cfg, Ranks(0, 2), resume=False)
    with pytest.raises(PipelineError, match="1, 2, 4 or 8 processes"):
        check_distributed(parse_config(_config(tiny_llama, eval_txt, tmp_path / "x", "GPTQ")), Ranks(0, 3), False)
    with pytest.raises(PipelineError, match="--resume"):
        check_distributed(parse_config(_config(tiny_llama, eval_txt, tmp_path / "x", "GPTQ")), Ranks(0, 2), True)


def test_torchrun_gives_each_process_its_own_gpu(monkeypatch):
    from llmc_tpu.pipeline import PipelineError, pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto", Ranks(1, 2, local_rank=1)) == torch.device("cuda", 1)
    assert pick_device("cuda", Ranks(0, 2, local_rank=0)) == torch.device("cuda", 0)
    with pytest.raises(PipelineError, match="every process would take that GPU"):
        pick_device("cuda:1", Ranks(0, 2))
    with pytest.raises(PipelineError, match="--nproc-per-node 2"):
        pick_device("auto", Ranks(3, 4, local_rank=3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="finished parts are parked in host memory from a GPU only")
def test_parts_parked_in_host_memory_give_the_same_sum(monkeypatch):
    from llmc_tpu.engine import distributed

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(40, 96, 96, device="cuda", generator=g) * 10 ** torch.randn(40, 1, 1, device="cuda", generator=g)

    def total() -> torch.Tensor:
        acc = OrderedSum(Shard(40), (96, 96), torch.float32, "cuda")
        for sample in x:
            acc.slot().add_(sample)
        return acc.result()

    on_device = total()
    monkeypatch.setattr(distributed, "HOST_NODE_BYTES", 0)
    distributed._PARKING.clear()
    parked = total()
    assert parked.device.type == "cuda" and torch.equal(parked, on_device)
    assert distributed._PARKING[((96, 96), torch.float32)]  # buffers came back for the next sum
    seq = torch.zeros_like(on_device)
    for sample in x:
        seq.add_(sample)
    assert not torch.equal(seq, on_device)  # the order matters for these values: the test can fail


@pytest.mark.parametrize("omp, world, local, expected", [
    ("1", 2, "2", "cores // 2"),  # torchrun's default: the cores shared among the host's processes
    ("1", 1, None, None),  # one process: torch's own choice
    ("3", 2, "2", None),  # the user's choice
    (None, 2, "2", None),
])
def test_torchrun_processes_share_the_host_cores(omp, world, local, expected, monkeypatch):
    for name, value in (("OMP_NUM_THREADS", omp), ("LOCAL_WORLD_SIZE", local)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    before = torch.get_num_threads()
    try:
        got = share_cpu_threads(Ranks(0, world, 0))
        cores = len(os.sched_getaffinity(0))
        assert got == (None if expected is None else max(1, cores // 2))
        assert torch.get_num_threads() == (before if got is None else got)
    finally:
        torch.set_num_threads(before)


def test_sums_in_the_fixed_order_need_one_row_per_sample():
    from llmc_tpu.engine.blockwise import BlockInput
    from llmc_tpu.pipeline import samples_lead

    ids = [torch.zeros(2, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long)]
    batch_first = [BlockInput(torch.zeros(2, 16, 8)), BlockInput(torch.zeros(1, 16, 8))]
    seq_first = [BlockInput(torch.zeros(16, 2, 8)), BlockInput(torch.zeros(16, 1, 8))]  # ChatGLM's layout
    assert samples_lead(batch_first, ids) and not samples_lead(seq_first, ids)
    with pytest.raises(IndexError, match="more samples than this process holds"):  # what the check prevents
        acc = OrderedSum(Shard(3), (1,), torch.float32, "cpu")
        for _ in range(16):
            acc.slot()
