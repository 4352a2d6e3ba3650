"""Several processes over one run (``torchrun``): who holds which calibration samples, and sums over all of them
that come out the same, bit for bit, whatever the number of processes.

Under ``torchrun --nproc-per-node N`` every process loads the model and builds the same calibration samples,
then keeps only its share: the samples are cut into ``PARTS`` equal parts in order, and process ``r`` of ``N``
takes parts ``r * PARTS / N`` to ``(r + 1) * PARTS / N``. Each process runs every block over its own samples.

What the methods compute from the samples (GPTQ's Hessians, AWQ's activation means, losses and Gram matrices)
is a sum over samples. Floating-point sums depend on their order, and GPTQ turns a difference in the last bit
of ``H`` into different codes, so every sum here is taken in one fixed order that does not depend on ``N``:

- large statistics (a Hessian per sample would not fit): ``OrderedSum``, each part summed sample by sample (or
  group of samples by group, ``add_samples``), then
  the parts added pairwise up a binary tree (``((p0 + p1) + (p2 + p3)) + ...``); a process sums the parts it
  holds up to its own subtree, the processes' subtrees are exchanged and added up the rest of the tree.
- small ones (a loss, a vector per sample): ``Shard.gather`` hands every process all the per-sample rows in
  sample order; each then reduces the same tensor.

One process (``N = 1``) takes the same sums, so N processes give the codes of one, given the same
calibration batches (``calib.bs: -1`` cuts micro-batches inside the parts for exactly that reason).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llmc_tpu.engine.transfer import host_buffer

PARTS = 8  # the most processes a run can use; the tree over the parts fixes the order of every sum
WORLD_SIZES = (1, 2, 4, 8)
TIMEOUT = datetime.timedelta(hours=4)  # rank 0 evaluates and saves alone while the others wait
# finished parts of a sum at least this large wait in pinned host memory (a 70B down_proj Hessian is 3.3 GB, and
# up to three wait at once): the device holds the part being summed and, while adding, the sibling brought back
HOST_NODE_BYTES = 1 << 30


class DistributedError(RuntimeError):
    """A torchrun launch this run cannot use; the message says why."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of the run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that evaluates, writes the outputs and reports."""
        return self.rank == 0


def launched_ranks() -> Ranks:
    """The ranks torchrun set in the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group(ranks: Ranks, device: torch.device) -> None:
    """Join the run's process group: NCCL between GPUs, gloo between CPU processes (``ranks.world`` checked by the
    pipeline: one of ``WORLD_SIZES``)."""
    if ranks.world == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))


def share_cpu_threads(ranks: Ranks) -> int | None:
    """Give each process of a torchrun launch its share of the host's cores; the number set, or None if untouched.

    torchrun sets ``OMP_NUM_THREADS=1`` in every process it starts when the variable is not set, and the host-side
    work of a run (rank 0's save packs every code on the CPU) then takes several times as long. ``1`` is taken as
    torchrun's default: the cores are divided among the host's processes instead. Any other value is kept.
    """
    if ranks.world == 1 or os.environ.get("OMP_NUM_THREADS") != "1":
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world)))
    torch.set_num_threads(threads)
    return threads


def close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parts(n: int) -> list[range]:
    """The ``PARTS`` parts of ``n`` samples, in order (sizes differ by at most one; some empty when n < PARTS)."""
    return [range(p * n // PARTS, (p + 1) * n // PARTS) for p in range(PARTS)]


def parts_sizes(n: int) -> list[int]:
    return [len(p) for p in parts(n)]


def micro_batches(n: int, size: int) -> list[range]:
    """Batches of at most ``size`` samples that never straddle two parts: whatever process holds a part, its
    samples go through a block in the same batches (and so the same kernels) as in a one-process run."""
    return [range(a, min(a + size, part.stop)) for part in parts(n) for a in range(part.start, part.stop, size)]


@dataclass(frozen=True)
class Shard:
    """The calibration samples of this process among ``n`` in all, and sums over all of them in the fixed order."""

    n: int
    ranks: Ranks = Ranks()

    @property
    def subtree(self) -> tuple[int, int]:
        """(level, index) of this process's node in the tree over the parts (level 0: the parts themselves)."""
        return (PARTS // self.ranks.world).bit_length() - 1, self.ranks.rank

    def parts_of(self, rank: int) -> range:
        per = PARTS // self.ranks.world
        return range(rank * per, (rank + 1) * per)

    def samples_of(self, rank: int) -> range:
        owned = [parts(self.n)[p] for p in self.parts_of(rank)]
        return range(owned[0].start, owned[-1].stop)

    @property
    def mine(self) -> range:
        return self.samples_of(self.ranks.rank)

    def part_of(self, sample: int) -> int:
        for p, part in enumerate(parts(self.n)):
            if sample in part:
                return p
        raise IndexError(f"sample {sample} of {self.n}")

    def matrix_rows(self, n: int) -> tuple[range, list[int]]:
        """This process's rows of an ``n``-row matrix whose rows are solved apart (GPTQ), and the sizes of the parts
        they are made of: the rows are cut into ``PARTS`` parts like the samples, and each process takes its parts."""
        cut = parts(n)
        mine = [cut[p] for p in self.parts_of(self.ranks.rank)]
        return range(mine[0].start, mine[-1].stop), [len(p) for p in mine]

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of this process's samples (per sample, in order) -> every process's, in process (= sample) order."""
        if self.ranks.world == 1:
            return rows
        count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=_collective_device())
        counts = [torch.empty_like(count) for _ in range(self.ranks.world)]
        dist.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
        pad = torch.zeros((max(sizes), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        pad[:rows.shape[0]] = rows
        sent = pad.view(torch.uint8) if pad.dtype == torch.int16 else pad  # NCCL has no int16: the bytes travel
        got = [torch.empty_like(sent) for _ in sizes]
        dist.all_gather(got, sent)
        return torch.cat([g.view(rows.dtype)[:k] for g, k in zip(got, sizes)])

    def total(self, count: int) -> int:
        """An integer summed over the processes (token counts)."""
        if self.ranks.world == 1:
            return count
        t = torch.tensor([count], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t)
        return int(t.item())


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _add(nodes: dict[tuple[int, int], torch.Tensor], level: int, index: int, value: torch.Tensor,
         fetch: Callable[[torch.Tensor], torch.Tensor]) -> tuple[int, int]:
    """Put a node in; while its sibling is there, add the two (left + right) into their parent. Returns the key of
    the node finally stored (the caller may move it); ``fetch`` brings a stored sibling back next to ``value``."""
    while (level, index ^ 1) in nodes:
        sibling = fetch(nodes.pop((level, index ^ 1)))
        left, right = (sibling, value) if index & 1 else (value, sibling)
        value = left.add_(right)
        level, index = level + 1, index // 2
    nodes[(level, index)] = value
    return (level, index)


def _fold(nodes: dict[tuple[int, int], torch.Tensor], level: int, index: int,
          fetch: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor | None:
    """The value of node (level, index): its own entry, else the sum of its children's (an absent child adds nothing)."""
    if (level, index) in nodes:
        return fetch(nodes.pop((level, index)))
    if level == 0:
        return None
    left, right = _fold(nodes, level - 1, 2 * index, fetch), _fold(nodes, level - 1, 2 * index + 1, fetch)
    if left is None or right is None:
        return right if left is None else left
    return left.add_(right)


# pinned host buffers of parked nodes, by (shape, dtype): reused across sums (one per pending node, at most four)
_PARKING: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}


def _park(value: torch.Tensor) -> torch.Tensor:
    """A finished node of a large sum moved to pinned host memory while the device sums the next part. Copies run
    on the device's current stream, so each lands before anything that later reads or reuses its memory."""
    pool = _PARKING.setdefault((tuple(value.shape), value.dtype), [])
    host = pool.pop() if pool else host_buffer(value.shape, value.dtype)  # not pinned: a plain (synchronous) copy
    return host.copy_(value, non_blocking=host.is_pinned())


def _unpark(node: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A node on ``device``: a parked one copied back (its buffer returns to the pool), any other as it is."""
    if node.device == torch.device(device):
        return node
    value = node.to(device, non_blocking=node.is_pinned())
    pool = _PARKING.setdefault((tuple(node.shape), node.dtype), [])
    if len(pool) < 4:
        pool.append(node)
    return value


class OrderedSum:
    """The sum of one tensor per sample over every sample of the run, in the fixed order (see the module doc).

    Samples come in order, this process's only: ``slot()`` gives the accumulator to add the next sample into
    (in place, e.g. ``addmm_``), ``result()`` (called by every process at the same point) the total. Memory: at
    most one accumulator per tree level (four with eight parts) while summing; finished parts of at least
    ``HOST_NODE_BYTES`` wait in host memory, so the device holds one. ``slot(per_sample=False)``: an
    accumulator for what is not one sample (the rows an MoE router sent to an expert), summed in the order it
    comes (one process only).
    """

    def __init__(self, shard: Shard, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> None:
        self.shard = shard
        self.shape, self.dtype, self.device = shape, dtype, device
        self.next = shard.mine.start
        self.part: int | None = None
        self.acc: torch.Tensor | None = None
        self.nodes: dict[tuple[int, int], torch.Tensor] = {}
        self.loose: torch.Tensor | None = None
        self.held: list[torch.Tensor] = []  # add_samples: the samples of the group not yet complete

    def slot(self, per_sample: bool = True) -> torch.Tensor:
        """The accumulator to add the next sample into (see the class doc)."""
        if not per_sample:
            if self.shard.ranks.world > 1:
                raise DistributedError("inputs that are not one row per calibration sample (an MoE expert's routed "
                                       "tokens) cannot be summed over several processes in a fixed order")
            if self.loose is None:
                self.loose = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            return self.loose
        if self.next >= self.shard.mine.stop:
            raise IndexError(f"more samples than this process holds ({len(self.shard.mine)})")
        part = self.shard.part_of(self.next)
        self.next += 1
        if part != self.part:
            self._close()
            self.part, self.acc = part, torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self.acc

    def add_samples(self, x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor], per_product: int) -> None:
        """Add the next samples ``x`` (``[samples, ...]``) as ``product(rows)`` of ``per_product`` samples at a time.

        The groups are counted from the start of each part (the last one of a part may be shorter) and their samples
        are concatenated across the batches they came in, held until the group is complete: one large product (a
        Gram matrix over thousands of tokens) instead of one per sample, and the same bits however the samples were
        batched. Within a part the groups' products are added in order. Not to be mixed with ``slot()`` in one sum.
        """
        start = 0
        while start < x.shape[0]:
            if self.next >= self.shard.mine.stop:
                raise IndexError(f"more samples than this process holds ({len(self.shard.mine)})")
            part_index = self.shard.part_of(self.next)
            part = parts(self.shard.n)[part_index]
            group_end = min(part.stop, self.next + per_product - (self.next - part.start) % per_product)
            take = min(x.shape[0] - start, group_end - self.next)
            self.held.append(x[start:start + take])
            start += take
            self.next += take
            if self.next < group_end:
                continue
            rows = self.held[0] if len(self.held) == 1 else torch.cat(self.held)
            self.held = []
            value = product(rows)
            if part_index != self.part:  # the part's first group: its product is the part's sum so far
                self._close()
                self.part, self.acc = part_index, value
            else:
                self.acc.add_(value)

    def _fetch(self, node: torch.Tensor) -> torch.Tensor:
        return _unpark(node, self.device)

    def _close(self) -> None:
        if self.acc is not None:
            acc, self.acc = self.acc, None
            key = _add(self.nodes, 0, self.part, acc, self._fetch)
            if acc.device.type != "cpu" and acc.numel() * acc.element_size() >= HOST_NODE_BYTES:
                self.nodes[key] = _park(self.nodes[key])

    def result(self) -> torch.Tensor:
        if self.held:
            raise RuntimeError(f"add_samples: the last group lacks samples ({sum(len(h) for h in self.held)} held)")
        self._close()
        level, index = self.shard.subtree
        mine = _fold(self.nodes, level, index, self._fetch)
        if self.shard.ranks.world > 1:
            held = torch.tensor([mine is not None], dtype=torch.int64, device=_collective_device())
            flags = [torch.empty_like(held) for _ in range(self.shard.ranks.world)]
            dist.all_gather(flags, held)
            value = mine if mine is not None else torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            got = [torch.empty_like(value) for _ in flags]
            dist.all_gather(got, value.contiguous())
            nodes = {(level, r): g for r, (g, f) in enumerate(zip(got, flags)) if int(f.item())}
            mine = _fold(nodes, (PARTS.bit_length() - 1), 0)
        if self.loose is not None:
            mine = self.loose if mine is None else mine.add_(self.loose)
        if mine is None:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return mine


class RunningSum:
    """``OrderedSum``'s interface without an order to keep: every slot is one running total, in the order the
    samples come (where no pipeline shard says which sample is which)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> None:
        self.total = torch.zeros(shape, dtype=dtype, device=device)

    def slot(self, per_sample: bool = True) -> torch.Tensor:
        return self.total

    def add_samples(self, x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor], per_product: int) -> None:
        """One product per batch, added to the total (no order to keep, so no group to complete)."""
        self.total.add_(product(x))

    def result(self) -> torch.Tensor:
        return self.total


def sample_sum(shard: Shard | None, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device | str) -> OrderedSum | RunningSum:
    """A sum over calibration samples: in the fixed order with the pipeline's shard, else a running total."""
    return RunningSum(shape, dtype, device) if shard is None else OrderedSum(shard, shape, dtype, device)
