"""Model families as data: where the blocks are and how their Linears group into subsets.

A family is a ``ModelSpec`` keyed by the Hugging Face ``model_type``; the algorithms
read it and never name a module themselves. A subset is a group of Linears that
read the same input (``layers``), the module whose output that input is
(``prev_op``, where AWQ folds 1/s), and the module whose output measures the loss
(``inspect``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Subset:
    """Linears of one block that share an input."""

    layers: tuple[str, ...]
    prev_op: str | None
    inspect: str
    inspect_needs_block_kwargs: bool = False  # attention needs masks and position embeddings


@dataclass(frozen=True)
class ModelSpec:
    """Where things are in one model family (names relative to the CausalLM)."""

    model_type: str
    display_name: str
    subsets: tuple[Subset, ...]
    blocks: str = "model.layers"
    embeddings: tuple[str, ...] = ("model.embed_tokens",)
    rotary: str | None = "model.rotary_emb"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    qk_layers: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")  # AWQ clipping skips these by default
    llm_convert: bool = True  # TPU-MLIR's llm_convert.py compiles this model_type
    aliases: tuple[str, ...] = field(default=())
    # VLMs: the vision tower and projector modules (float unless quant.quant_objects has vision), and
    # whether the language blocks' subsets come from text_config.model_type (Llava, InternVL)
    vision: tuple[str, ...] = field(default=())
    text_from_config: bool = False

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every quantized Linear of a block, in execution order."""
        return tuple(name for subset in self.subsets for name in subset.layers)


LLAMA_SUBSETS = (
    Subset(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "self_attn", True),
    Subset(("self_attn.o_proj",), "self_attn.v_proj", "self_attn.o_proj"),
    Subset(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp"),
    Subset(("mlp.down_proj",), "mlp.up_proj", "mlp.down_proj"),
)

_SPECS = (
    ModelSpec("llama", "Llama", LLAMA_SUBSETS, aliases=("Llama", "Llama2", "Llama3", "SmolLM")),
    ModelSpec("qwen2", "Qwen2", LLAMA_SUBSETS, aliases=("Qwen2", "Qwen2.5", "Qwen25")),
    ModelSpec("qwen3", "Qwen3", LLAMA_SUBSETS, aliases=("Qwen3",)),
    ModelSpec("mistral", "Mistral", LLAMA_SUBSETS, llm_convert=False, aliases=("Mistral",)),
)

# Vision-language models: the language blocks as in transformers 5 (``model.language_model``).
_VLM_PATHS = dict(blocks="model.language_model.layers", embeddings=("model.language_model.embed_tokens",),
                  rotary="model.language_model.rotary_emb", final_norm="model.language_model.norm")
_VLM_SPECS = (
    ModelSpec("qwen2_vl", "Qwen2-VL", LLAMA_SUBSETS, vision=("model.visual",), aliases=("Qwen2VL",), **_VLM_PATHS),
    ModelSpec("qwen2_5_vl", "Qwen2.5-VL", LLAMA_SUBSETS, vision=("model.visual",), aliases=("Qwen2.5VL", "Qwen25VL"),
              **_VLM_PATHS),
    ModelSpec("llava", "Llava", LLAMA_SUBSETS, vision=("model.vision_tower", "model.multi_modal_projector"),
              text_from_config=True, llm_convert=False, **_VLM_PATHS),
    ModelSpec("internvl", "InternVL", LLAMA_SUBSETS, vision=("model.vision_tower", "model.multi_modal_projector"),
              text_from_config=True, llm_convert=False, aliases=("InternVL2", "InternVL3"), **_VLM_PATHS),
)
_SPECS = (*_SPECS, *_VLM_SPECS)

REGISTRY: dict[str, ModelSpec] = {spec.model_type: spec for spec in _SPECS}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY: dict[str, ModelSpec] = {}
for _spec in _SPECS:
    for _name in (_spec.model_type, _spec.display_name, *_spec.aliases):
        _BY_KEY[_key(_name)] = _spec


def find_spec(name: str) -> ModelSpec | None:
    """The spec for an HF model_type or an anchor name (Llama, Qwen2, ...), any case."""
    return _BY_KEY.get(_key(name))


def supported_names() -> list[str]:
    return sorted(REGISTRY)
