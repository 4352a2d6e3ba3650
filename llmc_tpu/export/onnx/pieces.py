"""The torch modules exported as ONNX pieces, in the layout of LLM-TPU's per-piece flow.

Each wraps float32 copies of the Hugging Face model's own modules (norms, Linears, MLP, embedding,
lm_head); only attention is written out here, so that K/V come out seq-major (``[1, S, KV, D]``, K
after RoPE) and masks are additive inputs. Names come from the registry (``ModelSpec``), so every
Llama-layout family (llama, qwen2, qwen3, mistral) shares this code; Qwen3's per-head q/k norms
and Qwen2's q/k/v biases are picked up from the modules themselves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from llmc_tpu.export.onnx.graph import OnnxExportError
from llmc_tpu.models.registry import ModelSpec

MASK_VALUE = -10000.0  # additive mask value of LLM-TPU's exports


class LayoutError(OnnxExportError):
    """The model's blocks do not have the attention + MLP layout these pieces implement."""


@dataclass(frozen=True)
class DecoderLayout:
    """Module names inside one decoder block, read from the registry's subsets."""

    attn_norm: str
    attn: str
    q: str
    k: str
    v: str
    o: str
    mlp_norm: str
    mlp: str

    @staticmethod
    def from_spec(spec: ModelSpec) -> DecoderLayout:
        """Llama layout: subset 0 is q/k/v after the attention norm, then o_proj, then the MLP after its norm."""
        subsets = spec.subsets
        if len(subsets) < 3 or len(subsets[0].layers) != 3 or subsets[0].prev_op is None or subsets[2].prev_op is None:
            raise LayoutError(f"{spec.display_name}: the ONNX export needs blocks with q/k/v, o and an MLP "
                              "(registry subsets in the Llama layout)")
        q, k, v = subsets[0].layers
        return DecoderLayout(subsets[0].prev_op, subsets[0].inspect, q, k, v, subsets[1].layers[0],
                             subsets[2].prev_op, subsets[2].inspect)


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float

    @staticmethod
    def from_model(config, attn: nn.Module) -> AttentionShape:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return AttentionShape(heads, kv_heads, head_dim, float(getattr(attn, "scaling", head_dim ** -0.5)))


def float32_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A float32 copy of ``module`` whose parameters hold the values saved in ``dtype`` (what TPU-MLIR reads)."""
    out = copy.deepcopy(module).cpu()
    for p in out.parameters():
        p.requires_grad_(False)
        if p.is_floating_point():
            p.data = p.data.to(dtype).float()
    return out.eval()


def rope_tables(rotary: nn.Module, seq_length: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[seq_length, D]`` in float32 from the model's own rotary embedding (scaling included)."""
    device = next((b.device for b in rotary.buffers()), torch.device("cpu"))
    position_ids = torch.arange(seq_length, device=device).unsqueeze(0)
    probe = torch.zeros(1, seq_length, head_dim, dtype=torch.float32, device=device)
    with torch.no_grad():
        cos, sin = rotary(probe, position_ids)
    return cos[0].float().cpu().contiguous(), sin[0].float().cpu().contiguous()


def find_rotary(model: nn.Module, spec: ModelSpec, layout: DecoderLayout) -> nn.Module:
    """The model's rotary embedding: ``spec.rotary``, else one inside the first block's attention."""
    if spec.rotary:
        try:
            return model.get_submodule(spec.rotary)
        except AttributeError:
            pass
    attn = model.get_submodule(spec.blocks)[0].get_submodule(layout.attn)
    rotary = getattr(attn, "rotary_emb", None)
    if rotary is None:
        raise LayoutError(f"no rotary embedding at {spec.rotary!r} nor in {layout.attn}")
    return rotary


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PrefillBlock(nn.Module):
    """``block_i``: ``input_states [1,S,H]``, ``position_ids [1,S]``, ``attention_mask [1,1,S,S]`` ->
    ``hidden_states [1,S,H]``, ``past_k``, ``past_v [1,S,KV,D]`` (K after RoPE)."""

    def __init__(self, block: nn.Module, layout: DecoderLayout, shape: AttentionShape,
                 cos: torch.Tensor, sin: torch.Tensor) -> None:
        super().__init__()
        self.block, self.layout, self.shape = block, layout, shape
        self.attn = block.get_submodule(layout.attn)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    def _rope(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        cos = self.cos_table[position_ids].unsqueeze(2)  # [1, S, 1, D]
        sin = self.sin_table[position_ids].unsqueeze(2)
        return x * cos + _rotate_half(x) * sin

    def _qkv(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lay, sh, b = self.layout, self.shape, self.block
        s = x.shape[1]
        q = b.get_submodule(lay.q)(x).view(1, s, sh.heads, sh.head_dim)
        k = b.get_submodule(lay.k)(x).view(1, s, sh.kv_heads, sh.head_dim)
        v = b.get_submodule(lay.v)(x).view(1, s, sh.kv_heads, sh.head_dim)
        if getattr(self.attn, "q_norm", None) is not None:  # Qwen3: RMSNorm per head before RoPE
            q, k = self.attn.q_norm(q), self.attn.k_norm(k)
        return self._rope(q, position_ids), self._rope(k, position_ids), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q ``[1,S,H,D]``, k/v ``[1,T,KV,D]``, mask ``[1,1,S,T]`` -> ``[1,S,H*D]``."""
        sh = self.shape
        s, t = q.shape[1], k.shape[1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if sh.kv_heads != sh.heads:  # GQA: each kv head serves heads / kv_heads query heads
            groups = sh.heads // sh.kv_heads
            k = k[:, :, None].expand(1, sh.kv_heads, groups, t, sh.head_dim).reshape(1, sh.heads, t, sh.head_dim)
            v = v[:, :, None].expand(1, sh.kv_heads, groups, t, sh.head_dim).reshape(1, sh.heads, t, sh.head_dim)
        scores = torch.matmul(q, k.transpose(2, 3)) * sh.scaling + mask
        probs = torch.softmax(scores.float(), dim=-1)
        return torch.matmul(probs, v).transpose(1, 2).reshape(1, s, sh.heads * sh.head_dim)

    def _finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        lay, b = self.layout, self.block
        h = x + b.get_submodule(lay.o)(attn_out)
        return h + b.get_submodule(lay.mlp)(b.get_submodule(lay.mlp_norm)(h))

    def forward(self, input_states: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        normed = self.block.get_submodule(self.layout.attn_norm)(input_states)
        q, k, v = self._qkv(normed, position_ids)
        out = self._finish(input_states, self._attend(q, k, v, attention_mask))
        return out, k, v


class CacheBlock(PrefillBlock):
    """``block_cache_i``: one new token with ``history_k``/``history_v [1,S,KV,D]`` and
    ``attention_mask [1,1,1,S+1]`` (the last entry is the new token) -> ``hidden_states [1,1,H]``,
    ``past_k``, ``past_v [1,1,KV,D]`` (the new token's K/V only)."""

    def forward(self, input_states: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                history_k: torch.Tensor, history_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        normed = self.block.get_submodule(self.layout.attn_norm)(input_states)
        q, k, v = self._qkv(normed, position_ids)
        keys, values = torch.cat([history_k, k], dim=1), torch.cat([history_v, v], dim=1)
        out = self._finish(input_states, self._attend(q, keys, values, attention_mask))
        return out, k, v


class Embedding(nn.Module):
    """``embedding``: ``input_ids [1,S]`` -> ``input_states [1,S,H]``."""

    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class LmHead(nn.Module):
    """``lm_head``: the last position's ``hidden_states [1,H]`` -> final norm -> ``m_logits [1,V]``."""

    def __init__(self, norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden_states))


class GreedyHead(nn.Module):
    """``greedy_head``: ``m_logits [1,V]`` -> ``token [1,1]`` (argmax, as top-1)."""

    def forward(self, m_logits: torch.Tensor) -> torch.Tensor:
        _, token = torch.topk(m_logits.float(), 1)
        return token


def causal_mask(seq_length: int) -> torch.Tensor:
    """``[1,1,S,S]``: 0 where position j <= i, MASK_VALUE above the diagonal."""
    return torch.full((seq_length, seq_length), MASK_VALUE).triu(1).view(1, 1, seq_length, seq_length)


def decode_mask(seq_length: int, position: int) -> torch.Tensor:
    """``[1,1,1,S+1]`` for a token at ``position``: history entries ``< position`` and the token itself visible."""
    mask = torch.full((1, 1, 1, seq_length + 1), MASK_VALUE)
    mask[..., :position] = 0.0
    mask[..., seq_length] = 0.0
    return mask
