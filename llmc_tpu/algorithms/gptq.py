"""GPTQ on TPU-MLIR's grid: tensors in, integer codes out, no model knowledge.

The algorithm of Frantar et al. (running Hessian ``H = 2/n sum x x^T``, damping, the upper
Cholesky factor of ``H^-1``, column-by-column rounding with the error spread over the columns
not yet quantized, lazy block updates, act-order), with the group parameters of TPU-MLIR 1.30.2
(``rtn.tpu_grid``: fp32 math, round half away from zero) and two changes so that the result
survives as a GPTQ checkpoint that ``llm_convert.py -q auto`` reads code for code:

- **No zero point 0.** The checkpoint's v1 convention stores ``z - 1``, and TPU-MLIR adds the 1
  back: ``z = 0`` cannot be written. A group whose TPU grid gives ``z = 0`` (every weight above
  ``-s/2``) gets ``z = 1`` and ``s = max(max / (qmax - 1), s)``: the codes still cover the whole
  group (``(qmax - 1) * s >= max``), at most ``qmax / (qmax - 1)`` coarser. W8 per channel's
  signed codes ``c`` (zero 0) are written as ``c + 128`` with zero 128: the same weights.
- **Scales that survive fp16.** The checkpoint stores fp16 scales and TPU-MLIR casts them to
  bf16 for W*BF16: the dequantization (and so the error feedback, and our fake-quant) uses
  ``bf16(s)``, which fp16 holds exactly except below 2^-14, where the value fp16 can carry is used.
  Codes are computed with the fp32 ``s`` as TPU-MLIR's RTN does, so with no error to spread
  (identity Hessian) the codes are TPU-MLIR's RTN codes.

Other choices: dead columns (``diag(H) = 0``) get ``H = 1`` and keep their weights (the reference
zeroes them, which would move the TPU grid's min/max); groups are computed from the current
columns at the start of each group (pending lazy updates included), or from the original
weights up front with ``static_groups`` (needed with act-order: TPU-MLIR reads no ``g_idx``).
A Cholesky failure multiplies ``percdamp`` by 10 and retries, with a warning in the result.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llmc_tpu.algorithms import gptq_kernel
from llmc_tpu.engine.distributed import Shard, parts_sizes, sample_sum
from llmc_tpu.engine.tf32 import tf32_matmuls
from llmc_tpu.tpu.chips import quantized_out_features
from llmc_tpu.tpu.rtn import TpuQuantizedWeight, TpuWeightFormat, round_half_away, tpu_grid

DAMP_TRIES = 8  # percdamp, x10, ... x1e7
COLUMN_KERNEL = "auto"  # on CUDA: "auto" = the Triton kernel where Triton is installed, "graphs" = CUDA graphs


class GptqError(RuntimeError):
    """The solver cannot produce a result (non-finite Hessian, Cholesky failing at every damping)."""


def sequences(x: torch.Tensor) -> torch.Tensor:
    """Inputs ``[..., seq, K]`` as ``[n_seq, seq, K]``; rows ``[n, K]`` (an expert's routed tokens) as one sequence."""
    return x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.reshape(1, -1, x.shape[-1])


def token_factors(seqs: torch.Tensor, token_clip: float) -> torch.Tensor:
    """Per token of ``seqs`` (``[n_seq, seq, K]``) the factor ``clip_outlier_tokens`` scales it by (1: kept)."""
    sq = seqs.float().square().sum(-1)  # [n_seq, seq]
    cap = token_clip * sq.median(dim=1, keepdim=True).values
    return torch.where(sq > cap, (cap / sq.clamp_min(torch.finfo(torch.float32).tiny)).sqrt(), torch.ones_like(sq))


def clip_outlier_tokens(x: torch.Tensor, token_clip: float) -> torch.Tensor:
    """Scale down tokens whose squared norm exceeds ``token_clip`` times their sequence's median.

    A few tokens (attention sinks: the first of a window, some delimiters) carry "massive
    activations", hundreds to thousands of times the median squared norm, at the input of some
    Linears (down_proj). Left as they are they make most of ``sum x x^T`` (78% of it for one
    SmolLM2 layer), GPTQ then fits those few tokens and every other token pays: on held-out text
    the output error of ordinary tokens rose to 13x RTN's. Capping their norm keeps their direction
    in the statistics without letting them outweigh the rest. The median is taken per sequence
    (``x`` is ``[..., seq, K]``), so the result does not depend on how samples are batched.
    ``token_clip <= 0`` returns ``x`` unchanged.
    """
    if token_clip <= 0 or x.numel() == 0:
        return x
    seqs = sequences(x)
    return (seqs.float() * token_factors(seqs, token_clip)[..., None]).reshape(x.shape)


class Hessian:
    """``H = 2/n sum x x^T`` over every row of every batch added (float32).

    The sum is accumulated one sequence at a time and scaled only when ``h`` is read: the same sequences give
    the same ``H`` bit for bit however they were split into batches (GPTQ's column loop turns any difference
    in ``H``, even in the last bit, into different codes). With a ``shard`` (the pipeline's), sequences are
    summed in the fixed order of ``engine.distributed`` and ``finish()`` adds the other processes' sums; without,
    in the order they come. ``token_clip``: see ``clip_outlier_tokens`` (0 keeps every token as it is).

    ``sink_weight``: the first token of every sequence counts as that many tokens. It is where the attention
    sink sits: nearly every query attends to it, so an error in its keys and values reaches every token, yet it
    is one token in ``seq`` of the plain sum. Its input direction is rare, and GPTQ, minimizing the average,
    gave it 10x RTN's error in SmolLM2's q/k/v (docs/gptq.md). 1 counts it as one token.
    """

    def __init__(self, k: int, device: torch.device | str = "cpu", token_clip: float = 0.0,
                 shard: Shard | None = None, sink_weight: float = 1.0) -> None:
        self.device = torch.device(device)
        self.token_clip = token_clip
        self.sink_weight = sink_weight
        self.shard = shard
        self.acc = sample_sum(shard, (k, k), torch.float32, device)
        self.sum: torch.Tensor | None = None  # the total over every sample, once finish() has run
        self.n = 0
        self._h: torch.Tensor | None = None

    @property
    def h(self) -> torch.Tensor:
        if self._h is None:
            if self.sum is None:
                if self.shard is not None:
                    raise RuntimeError("Hessian.finish() first: the sum over the samples is not complete")
                self.finish()  # a running total: its current value
            if not self.n:
                self._h = torch.zeros_like(self.sum)
            elif self.shard is not None:  # a finished sum, scaled where it lies (a 70B down_proj's is 3.3 GB)
                self._h = self.sum.mul_(2 / self.n)
            else:  # a running total, which later batches may still add to
                self._h = self.sum * (2 / self.n)
        return self._h

    def finish(self) -> None:
        """Complete the sum over every process's samples (with a shard: every process calls it at the same point)."""
        if self.sum is None:
            self.sum = self.acc.result()
            if self.shard is not None:
                self.n = self.shard.total(self.n)
            self._h = None

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``[..., K]`` (``[batch, seq, K]``: per sequence, for the token clip and the order).

        Each sequence adds ``x^T x`` of its tokens, the sink's row scaled by ``sqrt(sink_weight)``, plus that of
        its clipped tokens scaled down. On CUDA the first product may use TF32 tensor cores when the inputs are
        bf16/f16: their values are exact in TF32 and the products exact in fp32, so only the order of the fp32
        sums differs from plain fp32 (several times faster for a 7B model's down_proj). The sink's row stays exact
        for a power-of-4 weight (a power-of-2 scale); the few clipped tokens are no longer bf16 values: plain fp32.
        """
        seqs = sequences(x.to(self.device))
        if seqs.numel() == 0:
            return
        clip = token_factors(seqs, self.token_clip) if self.token_clip > 0 else None
        main = clip == 1 if clip is not None else None  # tokens the first product takes as they are
        sink = self.sink_weight ** 0.5 if self.sink_weight != 1 and x.dim() >= 3 else None  # 2-D rows: no sequence
        exact_tf32 = seqs.dtype in (torch.bfloat16, torch.float16) and seqs.is_cuda
        for i, seq in enumerate(seqs):
            acc = self.acc.slot(x.dim() >= 3)  # an MoE expert's rows, 2-D, are not one sample (OrderedSum.slot)
            scaled = None
            weigh_sink = sink is not None and (main is None or bool(main[i, 0]))  # the sink among the tokens as they are
            if main is not None and not bool(main[i].all()):
                factors = clip[i][~main[i]]
                if sink is not None and not weigh_sink:  # a clipped sink: its weight on top of the clip
                    factors[0] *= sink
                scaled = seq[~main[i]].float() * factors[:, None]
                seq = seq[main[i]]
            seq = seq.to(torch.float32, copy=weigh_sink)  # the sink's row is scaled in place: a copy of our own
            if weigh_sink:
                seq[0] *= sink
            with tf32_matmuls(exact_tf32):
                acc.addmm_(seq.T, seq)
            if scaled is not None:
                acc.addmm_(scaled.T, scaled)
        self.n += seqs.shape[0] * seqs.shape[1]
        self._h = None


def storable_scale(scale: torch.Tensor, fmt: TpuWeightFormat) -> torch.Tensor:
    """The scale TPU-MLIR multiplies with when it reads ``scale`` from an fp16 checkpoint (float32)."""
    stored = scale.to(fmt.torch_scale_dtype)
    if fmt.scale_dtype == "bfloat16":  # exact for bf16 values >= 2^-14; below, what fp16 can carry
        stored = stored.to(torch.float16).to(torch.bfloat16)
    eff = stored.float()
    if not torch.isfinite(eff).all() or not torch.equal(eff.to(torch.float16).float(), eff):
        raise GptqError(f"a group scale ({float(scale.abs().max()):.3g}) does not fit fp16, the GPTQ checkpoint's scale type")
    return eff


def handoff_grid(w: torch.Tensor, fmt: TpuWeightFormat) -> tuple[torch.Tensor, torch.Tensor, int]:
    """TPU-MLIR's grid of ``w`` made writable as a GPTQ checkpoint: (scale, zero, groups moved off zero 0)."""
    scale, zero, signed = tpu_grid(w, fmt)
    if signed:  # W8 per channel: signed codes c written as c + 128 with zero 128
        zero = torch.full_like(zero, 128)
    no_zero = zero == 0
    fixes = int(no_zero.sum())
    if fixes:
        n, k = w.shape
        g = k if fmt.per_channel else fmt.group_size
        mx = w.float().reshape(n, k // g, g).amax(dim=2)
        scale = torch.where(no_zero, torch.maximum(mx / torch.tensor(fmt.qmax - 1.0, device=mx.device), scale), scale)
        zero = torch.where(no_zero, torch.ones_like(zero), zero)
    eff = storable_scale(scale, fmt)
    scale = torch.where(scale.to(fmt.torch_scale_dtype).float() == eff, scale, eff)
    return scale, zero.to(torch.int16), fixes


@dataclass
class GptqResult:
    """Codes, scales and zeros of one weight ``[N, K]`` in natural column order, plus what happened."""

    fmt: TpuWeightFormat
    codes: torch.Tensor  # int16 [N, K], unsigned 0..qmax
    scale: torch.Tensor  # float32 [N, n_groups]; the TPU multiplies with scale.to(fmt's scale dtype)
    zero: torch.Tensor  # int16 [N, n_groups], 1..qmax
    percdamp: float  # the damping finally used
    dead_columns: int = 0
    zero_point_fixes: int = 0  # groups moved from zero 0 to zero 1
    warnings: list[str] = field(default_factory=list)

    def tpu_weight(self, rows: slice = slice(None)) -> TpuQuantizedWeight:
        """Rows of the result as TPU-MLIR lowers a GPTQ checkpoint: integer codes for all rows
        when ``N % NPU_NUM == 0``, else the whole Linear folded to float (checked by verify)."""
        codes, scale, zero = self.codes[rows], self.scale[rows], self.zero[rows]
        n = codes.shape[0]
        n_int = quantized_out_features(n, self.fmt.bits, self.fmt.chip, per_channel=True)
        empty = codes.new_zeros(0, codes.shape[1], dtype=torch.float32)
        return TpuQuantizedWeight(self.fmt, codes, scale, zero, empty, signed=False, folded=n_int == 0 and n > 0)

    def dequantize(self) -> torch.Tensor:
        """float32 ``(q - z) * stored scale``, ``[N, K]``."""
        return dataclasses.replace(self.tpu_weight(), folded=False).dequantize()


def _inverse_cholesky(make_h: Callable[[], torch.Tensor], percdamp: float) -> tuple[torch.Tensor, float, list[str]]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising the damping on failure.

    ``make_h()`` builds ``H``, undamped; its memory then holds the inverse and the factor takes the first
    factor's, so no more than two ``[K, K]`` matrices live at once (a 70B down_proj's is 3.3 GB). It is called
    again only when a factorization of the inverse fails.
    """
    warnings = []
    h = make_h()
    diag = torch.diagonal(h).clone()
    mean_diag = float(diag.mean())
    for attempt in range(DAMP_TRIES):
        damp = float(f"{percdamp * 10 ** attempt:.12g}")
        torch.diagonal(h).copy_(diag).add_(damp * mean_diag)
        low, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            torch.cholesky_inverse(low, out=h)
            up, info = torch.linalg.cholesky_ex(h, upper=True, out=(low, torch.empty_like(info)))
            if int(info) == 0 and bool(torch.isfinite(up).all()):
                return up, damp, warnings
            del low, up
            h = make_h()  # it holds the inverse now
        if attempt + 1 < DAMP_TRIES:
            warnings.append(f"Cholesky failed with percdamp {damp:g}; retried with {damp * 10:g}")
    raise GptqError(f"Cholesky failed even with percdamp {damp:g}; the Hessian is degenerate "
                    "(check the calibration data)")


def _columns(ws: _Block, a: int, b: int, qmax: int) -> None:
    """Columns ``a..b-1`` of the block in ``ws``: round on the grid (``rtn.quantize_codes``' arithmetic),
    dequantize with the stored scale, spread the error over the block's later columns."""
    for jj in range(a, b):
        w, s, z = ws.W[:, jj], ws.S[:, jj], ws.Z[:, jj]
        q = (round_half_away(w / s) + z).clamp_(0, qmax)
        err = (w - (q - z) * ws.D[:, jj]) / ws.Hinv[jj, jj]
        ws.W[:, jj:].addcmul_(err[:, None], ws.Hinv[jj:jj + 1, jj:], value=-1)
        ws.Err[:, jj] = err
        ws.Q[:, jj] = q


class _Block:
    """Buffers of one block of columns. On CUDA a column range runs as one Triton kernel (``gptq_kernel``) or,
    without Triton or with ``COLUMN_KERNEL = "graphs"``, as a captured graph of ``_columns`` replayed on them
    (the column loop is hundreds of tiny kernels: launching them one by one costs more than running them)."""

    def __init__(self, n: int, width: int, device: torch.device) -> None:
        self.W, self.Err, self.Q, self.S, self.Z, self.D = (torch.zeros(n, width, device=device) for _ in range(6))
        self.Hinv = torch.zeros(width, width, device=device)
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}

    def run(self, a: int, b: int, qmax: int) -> None:
        if self.W.device.type != "cuda":
            _columns(self, a, b, qmax)
            return
        if COLUMN_KERNEL == "auto" and gptq_kernel.available(self.W.device):
            gptq_kernel.run_columns(self.W, self.Q, self.Err, self.S, self.Z, self.D, self.Hinv, a, b, qmax)
            return
        graph = self.graphs.get((a, b, qmax))
        if graph is None:
            saved = [t.clone() for t in (self.W, self.Err, self.Q)]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up before capture, as CUDA graphs require
                _columns(self, a, b, qmax)
            torch.cuda.current_stream().wait_stream(side)
            for t, v in zip((self.W, self.Err, self.Q), saved):
                t.copy_(v)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                _columns(self, a, b, qmax)
            self.graphs[a, b, qmax] = graph
        graph.replay()


_BLOCKS: OrderedDict[tuple[int, int, str], _Block] = OrderedDict()


def _block(n: int, width: int, device: torch.device) -> _Block:
    """A cached ``_Block`` (its graphs are reused by every Linear of the same shape); the 4 last used are kept."""
    key = (n, width, str(device))
    if key not in _BLOCKS:
        _BLOCKS[key] = _Block(n, width, device)
        while len(_BLOCKS) > 4:
            _BLOCKS.popitem(last=False)
    _BLOCKS.move_to_end(key)
    return _BLOCKS[key]


def row_chunk_bounds(sizes: list[int], n: int) -> list[slice]:
    if sum(sizes) != n or min(sizes, default=0) < 0:
        raise ValueError(f"row_chunks {sizes} do not add up to the {n} rows")
    ends = list(itertools.accumulate(sizes))
    return [slice(end - size, end) for end, size in zip(ends, sizes) if size]


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, fmt: TpuWeightFormat, blocksize: int = 128,
                  percdamp: float = 0.01, actorder: bool = False, static_groups: bool = False,
                  row_chunks: Sequence[int] | None = None, order: torch.Tensor | None = None) -> GptqResult:
    """Quantize ``w`` ``[N, K]`` on TPU-MLIR's grid, minimizing the output error on inputs with Hessian ``[K, K]``.

    ``order``: the columns in the order to solve them (a permutation of ``0..K-1``), in place of act-order's
    descending ``diag(H)``; like act-order it needs static groups. ``actorder=True`` is ``order=argsort(diag(H),
    descending=True)``.

    Every row is solved on its own (the error of a row is spread over that row's later columns), so the rows
    can be solved in pieces. ``row_chunks``: the sizes of the consecutive row chunks the matrix products of the
    error updates take one at a time (default: ``engine.distributed``'s parts of ``N``). The other steps are
    row by row, so a call on some whole chunks gives those rows of the call on all of them, bit for bit.
    """
    W = w.detach().float().clone()
    n, k = W.shape
    bounds = row_chunk_bounds(parts_sizes(n) if row_chunks is None else list(row_chunks), n)
    g = k if fmt.per_channel else fmt.group_size
    if k % g:
        raise ValueError(f"in_features {k} is not a multiple of the group size {g} (TPU-MLIR asserts K % G == 0)")
    if order is not None:
        order = torch.as_tensor(order, device=W.device)
        if not torch.equal(torch.sort(order).values, torch.arange(k, device=W.device)):
            raise ValueError(f"order is not a permutation of the {k} columns")
    reorder = actorder or order is not None
    if reorder and not static_groups and not fmt.per_channel:
        raise ValueError("act-order (or any given column order) needs static groups: TPU-MLIR reads no g_idx "
                         "(quant.special.static_groups: True)")
    if not torch.isfinite(hessian).all():
        raise GptqError("the Hessian has NaN/Inf values: the calibration activations overflowed")
    diag = torch.diagonal(hessian).to(W.device, torch.float32)
    dead = diag == 0
    diag = torch.where(dead, torch.ones_like(diag), diag)
    static = static_groups or fmt.per_channel
    group_fmt = dataclasses.replace(fmt, group_size=g) if not fmt.per_channel else fmt
    scale = W.new_zeros(n, k // g)
    zero = torch.zeros(n, k // g, dtype=torch.int16, device=W.device)
    fixes = 0
    if static:
        scale, zero, fixes = handoff_grid(W, fmt)
    deq = scale.to(fmt.torch_scale_dtype).float()
    if order is None:
        order = torch.argsort(diag, descending=True) if actorder else torch.arange(k, device=W.device)
    if reorder:
        W = W[:, order]

    def working_h() -> torch.Tensor:  # H on W's device, dead columns set to 1, in the solving order
        H = hessian.detach().to(W.device, torch.float32, copy=True)
        H.diagonal()[dead] = 1
        if reorder:
            H = H[order]
            H = H[:, order]
        return H

    group_of = order // g
    hinv, used, warnings = _inverse_cholesky(working_h, percdamp)
    Q = torch.zeros(n, k, dtype=torch.int16, device=W.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        ws = _block(n, i2 - i1, W.device)
        ws.W.copy_(W[:, i1:i2])
        ws.Hinv.copy_(hinv[i1:i2, i1:i2])
        ws.Err.zero_()
        if static:
            cols = group_of[i1:i2]
            ws.S.copy_(scale.index_select(1, cols))
            ws.Z.copy_(zero.index_select(1, cols))
            ws.D.copy_(deq.index_select(1, cols))
            ws.run(0, i2 - i1, fmt.qmax)
        a = 0
        while not static and a < i2 - i1:  # one run per (group, block) piece; a group's grid is set at its start
            j, gi = i1 + a, (i1 + a) // g
            if j % g == 0:  # the group's current columns, lazy updates still pending included
                cols = W[:, j:j + g].clone()
                inside = min(g, i2 - j)
                cols[:, :inside] = ws.W[:, a:a + inside]
                if inside < g and a:
                    for r in bounds:
                        cols[r, inside:] -= ws.Err[r, :a] @ hinv[i1:j, i2:j + g]
                s, z, f = handoff_grid(cols, group_fmt)
                scale[:, gi:gi + 1], zero[:, gi:gi + 1], fixes = s, z, fixes + f
                deq[:, gi:gi + 1] = s.to(fmt.torch_scale_dtype).float()
            b = min(i2, (gi + 1) * g) - i1
            ws.S[:, a:b], ws.Z[:, a:b], ws.D[:, a:b] = scale[:, gi:gi + 1], zero[:, gi:gi + 1].float(), deq[:, gi:gi + 1]
            ws.run(a, b, fmt.qmax)
            a = b
        Q[:, i1:i2] = ws.Q.to(torch.int16)
        for r in bounds:
            W[r, i2:].sub_(ws.Err[r] @ hinv[i1:i2, i2:])
    if reorder:
        Q = Q[:, torch.argsort(order)]
    return GptqResult(fmt, Q, scale, zero, used, int(dead.sum()), fixes, warnings)


def output_errors(w: torch.Tensor, candidates: Sequence[torch.Tensor], hessian: torch.Tensor) -> list[float]:
    """Per candidate ``Q``, the relative squared output error ``sum ||(W - Q) x||^2 / sum ||W x||^2`` over the
    calibration inputs. A diagnostic for the report: on CUDA the products may use TF32 (a 7B block's errors cost
    a tenth of the solve instead of half of it)."""
    w = w.float().to(hessian.device)
    with tf32_matmuls():
        den = float(((w @ hessian) * w).sum())
        errs = []
        for wq in candidates:
            d = w - wq.float().to(hessian.device)
            errs.append(float(((d @ hessian) * d).sum()) / den if den > 0 else 0.0)
    return errs


def output_error(w: torch.Tensor, wq: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative squared output error ``sum ||(W - Q) x||^2 / sum ||W x||^2`` over the calibration inputs."""
    return output_errors(w, [wq], hessian)[0]
