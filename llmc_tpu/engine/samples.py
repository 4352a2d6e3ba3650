"""Calibration samples of a block, addressable one by one: the inputs of a few samples as one call, fast.

A block's calibration inputs come as batches (``BlockInput``: hidden states ``[bs, seq, d]`` plus the
keyword arguments the model passed: masks, position ids, position embeddings). A method that draws a few
samples at a time (SignRound's optimizer steps) needs them as one call: where the batches' arguments
combine, every sample's hidden state, target and per-sample argument is stacked on the device once and a
draw is one ``index_select`` per tensor; arguments every sample shares (Llama's cos/sin) are kept as they
are. Where they do not combine, one call per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from llmc_tpu.engine.blockwise import BlockInput, move

log = logging.getLogger("llmc_tpu")


class _NotMergeable(Exception):
    pass


def _select(v: Any, bs: int, idx: torch.Tensor) -> Any:
    """Samples ``idx`` of an argument of a batch of ``bs`` samples: tensors (2-D or more) with leading dim
    ``bs`` are per sample, ``bs * m`` (3-D or more) per sample in blocks of m (ALiBi's ``[bs * heads, ...]``);
    everything else (leading dim 1, cache positions, flags) is shared by the samples and kept."""
    if isinstance(v, torch.Tensor) and v.dim() >= 2:
        if v.shape[0] == bs:
            return v[idx.to(v.device)]
        if v.dim() >= 3 and v.shape[0] % bs == 0:
            m = v.shape[0] // bs
            return v.reshape(bs, m, *v.shape[1:])[idx.to(v.device)].reshape(-1, *v.shape[1:])
        return v
    if isinstance(v, dict):
        return {k: _select(a, bs, idx) for k, a in v.items()}
    if isinstance(v, (tuple, list)):
        return type(v)(_select(a, bs, idx) for a in v)
    return v


def _each(vals: list[Any], sizes: list[int], fn: Any) -> Any:
    """A dict, tuple or list argument of every batch: ``fn`` on each entry across the batches (same keys or length)."""
    first = vals[0]
    if isinstance(first, dict):
        if not all(isinstance(v, dict) and v.keys() == first.keys() for v in vals):
            raise _NotMergeable
        return {k: fn([v[k] for v in vals], sizes) for k in first}
    if not all(type(v) is type(first) and len(v) == len(first) for v in vals):
        raise _NotMergeable
    return type(first)(fn([v[i] for v in vals], sizes) for i in range(len(first)))


def _merge(vals: list[Any], sizes: list[int]) -> Any:
    """One argument for the concatenated samples of several batches' selections (``sizes[i]`` samples each)."""
    first = vals[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) and v.dim() == first.dim() and v.dtype == first.dtype for v in vals):
            raise _NotMergeable
        if (first.dim() < 2 or first.shape[0] == 1) and all(v.shape == first.shape and torch.equal(v, first)
                                                             for v in vals[1:]):
            return first  # shared by every sample
        if first.dim() < 2:
            raise _NotMergeable
        parts, blocks = [], set()
        for v, k in zip(vals, sizes):
            if v.shape[0] == 1 and k > 1:  # broadcast over this batch: one copy per sample
                v = v.expand(k, *v.shape[1:])
            if v.shape[0] % k:
                raise _NotMergeable
            blocks.add(v.shape[0] // k)
            parts.append(v)
        if len(blocks) > 1 or len({v.shape[1:] for v in parts}) > 1:
            raise _NotMergeable
        return torch.cat(parts)
    if isinstance(first, (dict, tuple, list)):
        return _each(vals, sizes, _merge)
    for v in vals[1:]:
        try:
            same = v is first or bool(v == first)
        except Exception as e:  # an object without a usable ==
            raise _NotMergeable from e
        if not same:
            raise _NotMergeable
    return first


def _float32(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _float32(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_float32(v) for v in obj)
    return obj


class _Const:
    """An argument every call gets as it is (on the device, floats in float32)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _Rows:
    """A per-sample tensor argument of all the samples at once: ``data [n, ...]`` (``m`` rows per sample:
    ``[n, m, ...]``), so that a call takes its samples with one ``index_select``.

    Where the per-batch calls hand over a single row (``[1, ...]``) instead, they do here too: a batch whose
    tensor is a ``[1, ...]`` broadcast over its samples (``bcast``), alone in a call or with batches giving one
    row each, all equal (``_merge`` shares them); ``classes`` (which samples' rows are equal) is found on first use."""

    __slots__ = ("data", "m", "bcast", "_classes")

    def __init__(self, data: torch.Tensor, m: int, bcast: list[bool]) -> None:
        self.data, self.m, self.bcast, self._classes = data, m, bcast, None

    def classes(self) -> list[int]:
        if self._classes is None:
            n = self.data.shape[0]
            self._classes = torch.unique(self.data.reshape(n, -1), dim=0, return_inverse=True)[1].tolist()
        return self._classes


def _plan(vals: list[Any], sizes: list[int]) -> Any:
    """How a call gets an argument of which the batches hold ``vals`` (``sizes[i]`` samples each): nested
    dicts / tuples / lists of ``_Const`` and ``_Rows``. Raise ``_NotMergeable`` where that is not sure to give
    what ``_select`` + ``_merge`` would give for every choice of samples (then the calls are built per step)."""
    first = vals[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) and v.dim() == first.dim() and v.dtype == first.dtype
                   and v.device == first.device for v in vals):
            raise _NotMergeable
        if all(v.dim() < 2 or v.shape[0] == 1 for v in vals) and all(
                v.shape == first.shape and torch.equal(v, first) for v in vals[1:]):
            return _Const(first)  # shared by every sample (or one row each, all equal: _merge shares them)
        if first.dim() < 2 or len({v.shape[1:] for v in vals}) > 1:
            raise _NotMergeable
        blocks, bcast = set(), []
        for v, bs in zip(vals, sizes):
            if v.shape[0] == bs:  # per sample (as _select takes it)
                blocks.add(1)
                bcast.append(False)
            elif v.dim() >= 3 and v.shape[0] % bs == 0 and v.shape[0]:  # per sample, in blocks of m
                blocks.add(v.shape[0] // bs)
                bcast.append(False)
            elif v.shape[0] == 1:  # one row for every sample of its batch
                blocks.add(1)
                bcast.append(True)
            else:
                raise _NotMergeable
        if len(blocks) > 1:
            raise _NotMergeable
        m = blocks.pop()
        parts = [v.expand(bs, *v.shape[1:]) if b else v for v, bs, b in zip(vals, sizes, bcast)]
        data = parts[0] if len(parts) == 1 else torch.cat(parts)
        return _Rows(data.reshape(sum(sizes), m, *first.shape[1:]) if m > 1 else data, m, bcast)
    if isinstance(first, (dict, tuple, list)):
        return _each(vals, sizes, _plan)
    for v in vals[1:]:
        try:
            same = v is first or (type(v) is type(first) and bool(v == first))
        except Exception as e:  # an object without a usable ==
            raise _NotMergeable from e
        if not same:
            raise _NotMergeable
    return _Const(first)


def _on_device(plan: Any, device: torch.device) -> Any:
    """The plan with its tensors on ``device``, floats in float32 (as ``calls`` hands them over)."""
    if isinstance(plan, _Const):
        return _Const(_float32(move(plan.value, device)))
    if isinstance(plan, _Rows):
        return _Rows(_float32(plan.data.to(device)), plan.m, plan.bcast)
    if isinstance(plan, dict):
        return {k: _on_device(v, device) for k, v in plan.items()}
    return type(plan)(_on_device(v, device) for v in plan)


class CalibrationSamples:
    """The calibration samples of every batch of ``ctx.inputs`` as one sequence; ``calls(idx)`` gives the block
    calls for some of them: one call where the batches' arguments combine, else one per batch.

    Where they combine (one batch, or ``mergeable``), everything is put on the device once (``plan``): all
    hidden states as one float32 ``[n, ...]`` tensor, all targets, every per-sample argument stacked; a call
    then takes ``index_select``s of those, and arguments shared by the samples are handed over as they are."""

    def __init__(self, inputs: list[BlockInput], device: torch.device) -> None:
        self.inputs = inputs
        self.device = device
        self.sizes = [inp.hidden.shape[0] for inp in inputs]
        self.owner = [(p, i) for p, size in enumerate(self.sizes) for i in range(size)]
        self._targets: list[torch.Tensor] | None = None
        self._targets_all: torch.Tensor | None = None
        self.mergeable = False
        if len(inputs) > 1:
            try:
                self._merged([self._piece(p, [0]) for p in range(len(inputs))])
                self.mergeable = True
            except _NotMergeable:
                log.info("calibration samples: the calibration batches' block arguments differ; samples of different "
                         "batches run as separate calls")
        self.plan: dict[str, Any] | None = None
        self.hidden: torch.Tensor | None = None
        if inputs and (len(inputs) == 1 or self.mergeable) and len({inp.hidden.shape[1:] for inp in inputs}) == 1:
            try:
                self.plan = _on_device(_plan([inp.kwargs for inp in inputs], self.sizes), device)
            except _NotMergeable:
                log.info("calibration samples: the calibration batches' block arguments are built per step")
        if self.plan is not None:
            hidden = [inp.hidden.to(device).float() for inp in inputs]
            self.hidden = hidden[0] if len(hidden) == 1 else torch.cat(hidden)

    def __len__(self) -> int:
        return len(self.owner)

    @property
    def targets(self) -> list[torch.Tensor] | None:
        """Per batch, the float block's outputs on its samples."""
        return self._targets

    @targets.setter
    def targets(self, targets: list[torch.Tensor] | None) -> None:
        self.set_targets(None if targets is None else [[t] for t in targets])

    def set_targets(self, chunks: list[list[torch.Tensor]] | None) -> None:
        """The targets from their chunks, per batch in order; with a ``plan``, one tensor of which the batches'
        targets are views (one concatenation: no second copy)."""
        self._targets, self._targets_all = None, None
        if chunks is None:
            return
        if self.plan is None:
            self._targets = [torch.cat(c) for c in chunks]
            return
        flat = [t for c in chunks for t in c]
        self._targets_all = flat[0] if len(flat) == 1 else torch.cat(flat)
        self._targets = list(self._targets_all.split(self.sizes))

    def index(self, idx: list[int]) -> torch.Tensor:
        """The samples ``idx`` in the order ``calls`` runs them (batch by batch, in order), on the device."""
        idx = sorted(idx)
        if idx and idx[-1] - idx[0] == len(idx) - 1:  # a range (chunks): no copy to the device
            return torch.arange(idx[0], idx[-1] + 1, device=self.device)
        return torch.tensor(idx, dtype=torch.long).to(self.device)

    def _piece(self, p: int, local: list[int]) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor | None, int]:
        inp = self.inputs[p]
        idx = torch.tensor(local, dtype=torch.long)
        target = None if self._targets is None else self._targets[p][idx.to(self._targets[p].device)]
        return inp.hidden[idx.to(inp.hidden.device)], _select(inp.kwargs, self.sizes[p], idx), target, len(local)

    @staticmethod
    def _merged(parts: list[tuple]) -> tuple:
        sizes = [k for *_, k in parts]
        if len({h.shape[1:] for h, *_ in parts}) > 1:
            raise _NotMergeable
        hidden = torch.cat([h for h, *_ in parts])
        kwargs = _merge([kw for _, kw, _, _ in parts], sizes)
        target = None if parts[0][2] is None else torch.cat([t for _, _, t, _ in parts])
        return hidden, kwargs, target, sum(sizes)

    def calls(self, idx: list[int], index: torch.Tensor | None = None,
              ) -> list[tuple[torch.Tensor, tuple, dict[str, Any], torch.Tensor | None]]:
        """``(hidden, args, kwargs, target)`` on the device, floats in float32, for the samples ``idx``
        (``index``: ``self.index(idx)``, where the caller has it ready)."""
        if self.plan is not None:
            return [self._call(sorted(idx), self.index(idx) if index is None else index)]
        by_piece: dict[int, list[int]] = {}
        for i in sorted(idx):  # batch by batch, in order
            p, local = self.owner[i]
            by_piece.setdefault(p, []).append(local)
        parts = [self._piece(p, local) for p, local in by_piece.items()]
        if len(parts) > 1 and self.mergeable:
            try:
                parts = [self._merged(parts)]
            except _NotMergeable:
                pass
        out = []
        for hidden, kwargs, target, _ in parts:
            kwargs = _float32(move(kwargs, self.device))
            args = kwargs.pop("_positional", ())
            out.append((hidden.to(self.device).float(), args, kwargs, target))
        return out

    def _call(self, idx: list[int], index: torch.Tensor) -> tuple[torch.Tensor, tuple, dict[str, Any], torch.Tensor | None]:
        counts: dict[int, int] = {}  # samples per batch
        for i in idx:
            p = self.owner[i][0]
            counts[p] = counts.get(p, 0) + 1

        def build(plan: Any) -> Any:
            if isinstance(plan, _Const):
                return plan.value
            if isinstance(plan, _Rows):
                if plan.m == 1 and all(plan.bcast[p] or k == 1 for p, k in counts.items()) and (
                        len(counts) == 1 or len({plan.classes()[i] for i in idx}) == 1):
                    return plan.data[idx[0]:idx[0] + 1]  # one row for the call (see _Rows)
                rows = plan.data.index_select(0, index)
                return rows if plan.m == 1 else rows.reshape(-1, *rows.shape[2:])
            if isinstance(plan, dict):
                return {k: build(v) for k, v in plan.items()}
            return type(plan)(build(v) for v in plan)

        kwargs = build(self.plan)
        args = kwargs.pop("_positional", ())
        target = None if self._targets_all is None else self._targets_all.index_select(0, index)
        return self.hidden.index_select(0, index), args, kwargs, target

    def chunks(self, size: int) -> Iterator[list[int]]:
        """Every sample once, in chunks of at most ``size`` samples of one batch each."""
        start = 0
        for n in self.sizes:
            for a in range(0, n, size):
                yield list(range(start + a, start + min(a + size, n)))
            start += n
