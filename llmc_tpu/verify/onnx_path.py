"""``verify --onnx``: compile ONNX pieces with model_transform.py + model_deploy.py (the commands compile.sh runs),
compare the lowered weights with ours code for code, and run block_0 on TPU-MLIR's CPU simulator.

With ``--debug`` model_deploy keeps ``{piece}_tpu_lowered_{chip}_{quantize}_weight.npz`` in its
work folder. The ONNX frontend names a MatMul op after its output tensor plus ``_MatMul``; the
export names each Linear's MatMul output after the module (``model.layers.0.self_attn.q_proj``),
so a Linear ``L`` lowers to ``L_MatMul_uint``, ``L_MatMul_scale_bf16``, ``L_MatMul_zp`` (the same
layout as llm_convert's ``L_*`` keys, see ``llm_convert.py``; ``L_MatMul_0_*`` when split,
``L_MatMul_dequant_bf16`` when folded, ``L.bias_add_Add_*`` when a bias Add was fused in) and, for
rows left in float, ``L.weight_1_{r}_bf16`` (named after the weight initializer ``L.weight``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmc_tpu.export.onnx.compile_sh import piece_commands
from llmc_tpu.export.onnx.graph import MATMUL_OP_SUFFIXES, run_onnx
from llmc_tpu.export.onnx.pieces import causal_mask
from llmc_tpu.tpu.rtn import TpuQuantizedWeight, TpuWeightFormat, quantize_weight
from llmc_tpu.verify.compare import LinearCheck, VerifyResult, compare_linear, format_verify_table
from llmc_tpu.verify.llm_convert import LoweredLinear, read_lowered_linear
from llmc_tpu.verify.tpu_mlir_env import INSTALL_HINT, TpuMlirEnv, VerifyError, find_tpu_mlir

COSINE_MIN = 0.9999  # simulated block vs our fake-quant block
_TAIL_LINES = 25

# (inputs, our quantized Linears, the ONNX float weights) -> our fake-quant block's outputs
Reference = Callable[[dict[str, torch.Tensor], dict[str, TpuQuantizedWeight], dict[str, torch.Tensor]], list[np.ndarray]]


@dataclass
class SimResult:
    """One piece run on the CPU simulator against our fake-quant reference."""

    piece: str
    cosine: dict[str, float]  # per output
    rel_l2: dict[str, float]
    reference: str  # what it was compared with

    @property
    def ok(self) -> bool:
        return bool(self.cosine) and min(self.cosine.values()) >= COSINE_MIN


@dataclass
class OnnxVerifyResult:
    """Weights of every compiled piece (as VerifyResult rows) and the simulator run of block_0."""

    weights: VerifyResult
    pieces: list[str]
    sim: SimResult | None = None
    files: dict[str, Path] = field(default_factory=dict)  # piece -> its lowered-weight npz

    @property
    def ok(self) -> bool:
        return self.weights.ok and (self.sim is None or self.sim.ok)


def lowered_npz_path(work_dir: Path, piece: str, fmt: TpuWeightFormat) -> Path:
    return Path(work_dir) / f"{piece}_tpu_lowered_{fmt.chip}_{fmt.llm_convert_quantize}_weight.npz"


def _tail(log: Path) -> str:
    lines = [ln.rsplit("\r", 1)[-1][:300] for ln in log.read_text(encoding="utf-8", errors="replace").split("\n")]
    return "\n".join([f"--- {log}", *[ln for ln in lines if ln.strip()][-_TAIL_LINES:]])


def _run(env: TpuMlirEnv, argv: list[str], work_dir: Path, log: Path, timeout_s: float | None) -> None:
    rc = env.run([str(env.tool(argv[0])), *argv[1:]], cwd=work_dir, log=log, timeout_s=timeout_s)
    if rc != 0:
        raise VerifyError(f"{argv[0]} failed (exit {rc}): {' '.join(argv)}\n(if TPU-MLIR itself is broken, {INSTALL_HINT})\n"
                          f"{_tail(log)}")


def compile_piece(env: TpuMlirEnv, onnx_dir: Path, piece: str, fmt: TpuWeightFormat, seq_length: int, work_dir: Path,
                  timeout_s: float | None = None) -> Path:
    """compile.sh's two commands for ``piece`` (model_deploy with ``--debug``); returns the lowered-weight npz."""
    cmds = piece_commands(piece, fmt, seq_length, onnx_dir=str(Path(onnx_dir).resolve()))
    work_dir.mkdir(parents=True, exist_ok=True)
    _run(env, cmds.transform, work_dir, work_dir / f"{piece}_transform.log", timeout_s)
    _run(env, [*cmds.deploy, "--debug"], work_dir, work_dir / f"{piece}_deploy.log", timeout_s)
    npz = lowered_npz_path(work_dir, piece, fmt)
    if not npz.is_file():
        raise VerifyError(f"model_deploy.py left no {npz.name} in {work_dir}")
    return npz


class _OpKeys(Mapping):
    """An npz viewed with ``L_MatMul_*`` (or ``L.bias_add_Add_*``) keys read as ``L_*``, as read_lowered_linear expects."""

    def __init__(self, npz: Mapping[str, np.ndarray], names: list[str]) -> None:
        self._npz = npz
        self._map = {}
        for key in npz.keys():
            short = key
            for name in names:
                for suffix in MATMUL_OP_SUFFIXES:
                    if key.startswith(name + suffix + "_"):
                        short = name + key[len(name) + len(suffix):]
            self._map[short] = key

    def __getitem__(self, key: str) -> np.ndarray:
        return self._npz[self._map[key]]

    def __iter__(self):
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)


def read_onnx_lowered(npz: Mapping[str, np.ndarray], name: str, k: int, bits: int) -> LoweredLinear | None:
    """Linear ``name`` from a model_deploy lowered-weight npz (ONNX path naming, see the module docstring)."""
    return read_lowered_linear(_OpKeys(npz, [name]), name, k, bits)


def onnx_linear_weights(path: Path) -> dict[str, torch.Tensor]:
    """The Linear weights an exported piece holds: ``<name>.weight`` initializers ``[K, N]`` -> ``{name: [N, K]}``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2}
    return {t.name[: -len(".weight")]: torch.from_numpy(numpy_helper.to_array(t).T.copy()).float()
            for t in model.graph.initializer if t.name.endswith(".weight") and t.name in matmul_weights}


def compare_piece(onnx_path: Path, npz_path: Path, fmt: TpuWeightFormat
                  ) -> tuple[list[LinearCheck], dict[str, TpuQuantizedWeight], dict[str, torch.Tensor]]:
    """Every quantized Linear of one piece: ``quantize_weight`` of its ONNX weight against the compiler's.

    Returns the table rows, our quantized Linears and the ONNX float weights, keyed by Linear name.
    """
    rows, quantized = [], {}
    with np.load(npz_path) as npz:
        data = dict(npz)
    weights = onnx_linear_weights(onnx_path)
    for name, w in weights.items():
        quantized[name] = quantize_weight(w, fmt)
        rows.append(compare_linear(name, quantized[name], read_onnx_lowered(data, name, w.shape[1], fmt.bits)))
    return rows, quantized, weights


def prefill_inputs(onnx_path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic inputs for a ``block_i.onnx``: random states, positions 0..S-1, a causal mask."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    _, s, h = dims["input_states"]
    g = torch.Generator().manual_seed(seed)
    return {"input_states": torch.randn(1, s, h, generator=g), "position_ids": torch.arange(s, dtype=torch.int64).view(1, s),
            "attention_mask": causal_mask(s)}


def onnx_fake_quant_reference(onnx_path: Path, work_dir: Path) -> Reference:
    """A reference that runs the piece with onnxruntime, its Linear weights replaced by what the TPU multiplies with."""
    import onnx
    from onnx import numpy_helper

    def run(inputs: dict[str, torch.Tensor], quantized: dict[str, TpuQuantizedWeight],
            onnx_weights: dict[str, torch.Tensor]) -> list[np.ndarray]:
        model = onnx.load(str(onnx_path))
        for t in model.graph.initializer:
            name = t.name[: -len(".weight")]
            if t.name.endswith(".weight") and name in quantized:
                t.CopyFrom(numpy_helper.from_array(quantized[name].dequantize().T.contiguous().numpy(), t.name))
        path = work_dir / f"fake_quant_{onnx_path.name}"
        onnx.save_model(model, str(path))
        return run_onnx(path, inputs)

    return run


def torch_fake_quant_reference(model: torch.nn.Module, spec, fmt: TpuWeightFormat, layer: int = 0) -> Reference:
    """Our fake-quant torch block: block ``layer`` of the Hugging Face ``model`` (as exported, float32) with each
    Linear weight replaced by ``TpuQuantizedWeight.dequantize()``. Refuses ONNX weights that are not the model's."""
    from llmc_tpu.export.onnx.export import OnnxModel

    def run(inputs: dict[str, torch.Tensor], quantized: dict[str, TpuQuantizedWeight],
            onnx_weights: dict[str, torch.Tensor]) -> list[np.ndarray]:
        om = OnnxModel(model, spec, inputs["input_states"].shape[1], fmt.handoff_dtype)
        float_block = om.block(layer).block
        prefix = f"{spec.blocks}.{layer}."
        weights = {}
        for name in spec.linear_names:
            if prefix + name not in quantized:
                raise VerifyError(f"{prefix + name} has no weight in the ONNX piece")
            if not torch.equal(onnx_weights[prefix + name], float_block.get_submodule(name).weight):
                raise VerifyError(f"{prefix + name}: the ONNX weight is not the model's (exported from another model?)")
            weights[name] = quantized[prefix + name].dequantize()
        with torch.no_grad():
            return [o.numpy() for o in om.block(layer, weights=weights)(**inputs)]

    return run


def simulate(env: TpuMlirEnv, piece: str, bmodel: Path, inputs: dict[str, torch.Tensor], reference: list[np.ndarray],
             work_dir: Path, reference_name: str, timeout_s: float | None = None) -> SimResult:
    """Run ``bmodel`` with model_runner.py (the CPU simulator) and compare each output with ``reference``."""
    in_npz, out_npz = work_dir / f"{piece}_sim_in.npz", work_dir / f"{piece}_sim_out.npz"
    np.savez(in_npz, **{k: v.numpy() for k, v in inputs.items()})
    _run(env, ["model_runner.py", "--input", str(in_npz), "--model", str(bmodel), "--output", str(out_npz)],
         work_dir, work_dir / f"{piece}_runner.log", timeout_s)
    with np.load(out_npz) as z:
        outs = [z[k].astype(np.float32) for k in z.files]
    if len(outs) != len(reference):
        raise VerifyError(f"model_runner.py returned {len(outs)} outputs for {piece}, expected {len(reference)}")
    cosine, rel = {}, {}
    for name, sim, ref in zip(("hidden_states", "past_k", "past_v"), outs, reference):
        a, b = torch.from_numpy(sim).double().flatten(), torch.from_numpy(np.asarray(ref)).double().flatten()
        cosine[name] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        rel[name] = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return SimResult(piece, cosine, rel, reference_name)


def verify_onnx(onnx_dir: Path, fmt: TpuWeightFormat, work_dir: Path, pieces: tuple[str, ...] = ("block_0",),
                simulate_block: bool = True, reference: Reference | None = None, env: TpuMlirEnv | None = None,
                timeout_s: float | None = None) -> OnnxVerifyResult:
    """Compile ``pieces`` of ``onnx_dir`` as compile.sh does, compare their Linears with ours, simulate block_0.

    ``reference(inputs, quantized, onnx_weights)`` gives our fake-quant block's outputs
    (``torch_fake_quant_reference``); by default the ONNX graph itself, run with onnxruntime on the dequantized
    weights (the export checked the graph against torch).
    """
    onnx_dir, work_dir = Path(onnx_dir).resolve(), Path(work_dir).resolve()
    env = env or find_tpu_mlir()
    seq_length = _seq_length(onnx_dir / "block_0.onnx")
    if work_dir.exists():
        shutil.rmtree(work_dir)
    rows: list[LinearCheck] = []
    files: dict[str, Path] = {}
    block_0 = None
    for piece in pieces:
        onnx_path = onnx_dir / f"{piece}.onnx"
        if not onnx_path.is_file():
            raise VerifyError(f"{onnx_path} not found")
        files[piece] = compile_piece(env, onnx_dir, piece, fmt, seq_length, work_dir, timeout_s)
        piece_rows, quantized, weights = compare_piece(onnx_path, files[piece], fmt)
        if piece.startswith("block_cache_"):  # the same Linears as block_i, compiled a second time
            for r in piece_rows:
                r.name += f" ({piece})"
        rows += piece_rows
        if piece == "block_0":
            block_0 = quantized, weights
    result = OnnxVerifyResult(VerifyResult(onnx_dir, fmt, work_dir, rows), list(pieces), files=files)
    if simulate_block and block_0 is not None:
        inputs = prefill_inputs(onnx_dir / "block_0.onnx")
        name = "fake-quant torch block" if reference is not None else "fake-quant ONNX block (onnxruntime)"
        ref = (reference or onnx_fake_quant_reference(onnx_dir / "block_0.onnx", work_dir))(inputs, *block_0)
        result.sim = simulate(env, "block_0", work_dir / "block_0.bmodel", inputs, ref, work_dir, name, timeout_s)
    return result


def _seq_length(block: Path) -> int:
    import onnx

    if not block.is_file():
        raise VerifyError(f"{block} not found: give a folder written by save.save_onnx")
    graph = onnx.load(str(block), load_external_data=False).graph
    shape = next(i for i in graph.input if i.name == "input_states").type.tensor_type.shape
    return shape.dim[1].dim_value


def format_sim(sim: SimResult) -> str:
    cos = ", ".join(f"{k} {v:.6f}" for k, v in sim.cosine.items())
    rel = ", ".join(f"{k} {v:.4f}" for k, v in sim.rel_l2.items())
    verdict = "ok" if sim.ok else f"BELOW {COSINE_MIN}"
    return (f"{sim.piece} on TPU-MLIR's CPU simulator vs our {sim.reference}: cosine {cos} ({verdict}); "
            f"relative L2 {rel}")


def format_onnx_result(result: OnnxVerifyResult) -> str:
    """The Linear table of the compiled pieces, then the simulator line."""
    lines = [f"pieces compiled with model_transform.py + model_deploy.py: {', '.join(result.pieces)}",
             format_verify_table(result.weights)]
    if result.sim is not None:
        lines.append(format_sim(result.sim))
    return "\n".join(lines)


def verify_saved_onnx(save_path: Path, fmt: TpuWeightFormat, work_dir: Path, layers: tuple[int, ...] = (0,),
                      env: TpuMlirEnv | None = None) -> OnnxVerifyResult:
    """``llmc-tpu verify --onnx``: the run's ``onnx/`` folder, block_i and block_cache_i of ``layers``; block_0 is
    simulated against the fake-quant torch block of ``transformed_model/`` when the run saved it (else onnxruntime)."""
    save_path = Path(save_path)
    onnx_dir = save_path / "onnx"
    if not (onnx_dir / "block_0.onnx").is_file():
        raise VerifyError(f"{onnx_dir}/block_0.onnx not found (the run had save.save_onnx off)")
    pieces = tuple(p for i in layers for p in (f"block_{i}", f"block_cache_{i}"))
    reference = None
    model_dir = save_path / "transformed_model"
    if model_dir.is_dir():
        from llmc_tpu.models.loading import load_model

        loaded = load_model(str(model_dir))
        reference = torch_fake_quant_reference(loaded.model, loaded.spec, fmt)
    return verify_onnx(onnx_dir, fmt, work_dir, pieces, reference=reference, env=env)
