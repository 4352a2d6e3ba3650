"""MoE experts as one Linear per expert, so every algorithm sees them as ordinary Linears.

transformers 5 keeps a block's experts as two 3-D parameters (``gate_up_proj [E, 2I, H]``, gate
rows first, and ``down_proj [E, H, I]``) and loops over the experts the router picked. After
loading, ``unfuse_experts`` replaces that module by ``UnfusedExperts``: the same loop over
``E`` small MLPs with ``nn.Linear`` gate/up/down (named as in the family's checkpoints), so a
forward hook on an expert's Linear sees exactly the tokens routed to that expert. Saving goes
back through ``fused_state_dict``, and transformers writes its usual per-expert checkpoint keys.
"""

from __future__ import annotations

import torch
from torch import nn

from llmc_tpu.models.registry import FusedExperts, ModelSpec


class ExpertMlp(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, names: tuple[str, str, str], gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 act: nn.Module) -> None:
        super().__init__()
        self.names = names
        for name, w in zip(names, (gate, up, down)):
            linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            linear.weight.data = w.detach().clone()
            self.add_module(name, linear)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class UnfusedExperts(nn.Module):
    """Drop-in for transformers' fused experts module: ``forward(hidden [T, H], top_k_index, top_k_weights)``."""

    def __init__(self, fused: nn.Module, layout: FusedExperts) -> None:
        super().__init__()
        gate_up, down = fused.gate_up_proj, fused.down_proj
        self.num_experts = gate_up.shape[0]
        self.layout = layout
        inter = gate_up.shape[1] // 2
        for e in range(self.num_experts):
            self.add_module(str(e), ExpertMlp(layout.names, gate_up[e, :inter], gate_up[e, inter:], down[e], fused.act_fn))

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, e: int) -> ExpertMlp:
        return getattr(self, str(e))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            y = self[e](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) as transformers stores them."""
        gate, up, down = self.layout.names
        gate_up = torch.stack([torch.cat([getattr(self[e], gate).weight, getattr(self[e], up).weight]) for e in range(len(self))])
        return gate_up, torch.stack([getattr(self[e], down).weight for e in range(len(self))])


def unfuse_experts(model: nn.Module, spec: ModelSpec) -> int:
    """Replace every block's fused experts by ``UnfusedExperts``; return how many blocks had experts."""
    if spec.experts is None:
        return 0
    n = 0
    for block in model.get_submodule(spec.blocks):
        try:
            fused = block.get_submodule(spec.experts.path)
        except AttributeError:
            continue  # a dense block (DeepSeek-V2's first layers, Qwen2-MoE's mlp_only_layers)
        if isinstance(fused, UnfusedExperts) or not hasattr(fused, "gate_up_proj"):
            continue
        parent_name, _, child = spec.experts.path.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, child, UnfusedExperts(fused, spec.experts))
        n += 1
    return n


def fused_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every ``UnfusedExperts``' per-expert weights put back as transformers' fused parameters."""
    unfused = [(name, m) for name, m in model.named_modules() if isinstance(m, UnfusedExperts)]
    if not unfused:
        return state
    state = dict(state)
    for name, module in unfused:
        prefix = name + "."
        per_expert = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        gate, up, down = (tuple(per_expert[f"{prefix}{e}.{leaf}.weight"] for e in range(len(module)))
                          for leaf in module.layout.names)
        state[prefix + "gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(gate, up)])
        state[prefix + "down_proj"] = torch.stack(down)
    return state
