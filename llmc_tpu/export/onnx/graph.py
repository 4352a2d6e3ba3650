"""Export one torch piece to ONNX, name its Linears after the model's modules, and run it with onnxruntime."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 15  # TPU-MLIR 1.30.2 ships onnx 1.14.1 / onnxruntime 1.16.3
_PROTOBUF_LIMIT = 2**31 - 2**26  # keep a margin below protobuf's 2 GiB; above it weights go to a side file
# TPU-MLIR's ONNX frontend names a MatMul op after its output tensor plus "_MatMul", and a MatMul fused with
# its bias Add after the Add's output plus "_Add"; the lowered weights of Linear L are then "<op>_uint", ...
MATMUL_OP_SUFFIXES = ("_MatMul", ".bias_add_Add")
BIAS_ADD = ".bias_add"  # the bias Add's output tensor of Linear L is named L + BIAS_ADD


class OnnxExportError(RuntimeError):
    """An ONNX piece could not be written or does not reproduce its torch module."""


def export_piece(module: nn.Module, inputs: Mapping[str, torch.Tensor], output_names: Sequence[str], path: Path,
                 linears: Mapping[str, nn.Linear] | None = None,
                 dynamic_axes: Mapping[str, Mapping[int, str]] | None = None) -> Path:
    """Write ``module`` as an fp32 ONNX graph at ``path``.

    ``linears`` maps a full module name (``model.layers.0.self_attn.q_proj``) to the Linear it names:
    its MatMul's output tensor is renamed to that name (a bias Add's output to ``<name>.bias_add``) and
    its weight to ``<name>.weight``, so that TPU-MLIR's lowered weights are named ``<name>_MatMul_*``
    (``<name>.bias_add_Add_*`` when the bias is fused), see MATMUL_OP_SUFFIXES.
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
            torch.onnx.export(module, tuple(inputs.values()), str(raw), dynamo=False, opset_version=OPSET,
                              input_names=list(inputs), output_names=list(output_names), do_constant_folding=True,
                              dynamic_axes=dict(dynamic_axes) if dynamic_axes else None)
        model = onnx.load(str(raw))  # external data, if the exporter wrote any, is read back here
    if linears:
        name_linears(model, linears)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = sum(_nbytes(t) for t in model.graph.initializer) > _PROTOBUF_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=big, location=path.name + ".data" if big else None)
    return path


def _nbytes(tensor) -> int:
    """An initializer's size without serializing it (protobuf refuses to serialize more than 2 GiB)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    return int(np.prod(tensor.dims, dtype=np.int64)) * tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def name_linears(model, linears: Mapping[str, nn.Linear]) -> None:
    """Rename each Linear's MatMul output to the Linear's name and its weight initializer to ``<name>.weight``.

    The exporter stores ``W.T`` as an anonymous initializer; it is found by value (exact fp32 equality).
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for name, linear in linears.items():
        wt = linear.weight.detach().float().T.contiguous().numpy()
        found = [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits
                 and tuple(inits[n.input[1]].dims) == wt.shape
                 and np.array_equal(numpy_helper.to_array(inits[n.input[1]]), wt)]
        if len(found) != 1:
            raise OnnxExportError(f"{name}: found {len(found)} MatMuls with its weight in the exported graph (need exactly 1)")
        node = found[0]
        old_w, old_out = node.input[1], node.output[0]
        if len(consumers.get(old_w, [])) != 1:
            raise OnnxExportError(f"{name}: its weight is shared with another node")
        inits[old_w].name = name + ".weight"
        node.input[1] = name + ".weight"
        outputs = {o.name for o in model.graph.output}
        if old_out in outputs:  # a graph output keeps its public name
            continue
        _rename_tensor(model, old_out, name)
        bias_add = consumers.get(old_out, [])
        if len(bias_add) == 1 and bias_add[0].op_type == "Add" and bias_add[0].output[0] not in outputs:
            other = [x for x in bias_add[0].input if x != name]
            if len(other) == 1 and other[0] in inits and int(np.prod(inits[other[0]].dims)) == wt.shape[1]:
                _rename_tensor(model, bias_add[0].output[0], name + BIAS_ADD)


def _rename_tensor(model, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for vi in list(model.graph.value_info) + list(model.graph.output):
        if vi.name == old:
            vi.name = new


def run_onnx(path: Path, inputs: Mapping[str, torch.Tensor]) -> list[np.ndarray]:
    """Run a piece with onnxruntime on the CPU; outputs in graph order."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in inputs.items()})


def max_rel_error(ours: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    """``max |ours - ref| / max |ref|``: the worst element, relative to the tensor's scale."""
    a = torch.as_tensor(np.asarray(ours)).double()
    b = torch.as_tensor(np.asarray(ref)).double()
    if a.shape != b.shape:
        raise OnnxExportError(f"shape {tuple(a.shape)} differs from torch's {tuple(b.shape)}")
    scale = b.abs().max().item() if b.numel() else 0.0
    return float((a - b).abs().max().item() / max(scale, 1e-30)) if b.numel() else 0.0
