"""Model families as data: where the blocks are and how their Linears group into subsets.

A family is a ``ModelSpec`` keyed by the Hugging Face ``model_type``; the algorithms read it and
never name a module themselves. A subset is a group of Linears that read the same input
(``layers``), the module whose output that input is (``prev_op``, where AWQ folds 1/s), and the
module whose output measures the loss (``inspect``; its input is the subset's input).

What the data can say beyond the Llama layout (``docs/models.md`` has the rules and decisions):

- ``prev_op`` alternatives: a tuple, the first one the block has is used (Falcon's ``ln_attn`` /
  ``input_layernorm`` variants, StableLM's parallel residual). ``None``: AWQ leaves the subset
  unscaled (behind a GELU, which 1/s cannot pass through; an interleaved v).
- Fused Linears (``ModelSpec.fused``): one Linear whose output is split (Phi3 ``qkv_proj`` and
  ``gate_up_proj``, Bloom/Falcon ``query_key_value``). ``"name:part"`` as a prev_op means the rows of
  that part (the v rows feeding o_proj, the up rows feeding down_proj).
- Norms: ``norm_offset`` 1 for Gemma's ``(1 + weight)`` RMSNorm; a LayerNorm's bias is divided by s
  with its weight.
- Parallel blocks (Falcon, Phi): subsets whose prev_op is the same module are scaled jointly (one s,
  the sum of their losses), since one norm can take only one 1/s.
- MoE: ``{e}`` in a name stands for each expert of the block (one subset per expert); ``scale_only``
  modules read the subset's input and take s without being quantized (routers, Qwen2-MoE's
  shared-expert gate); ``experts`` says how transformers' 3-D expert weights become one Linear per
  expert at load time (``models/experts.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

EXPERT = "{e}"  # in a subset's names: every expert of the block, one subset each


@dataclass(frozen=True)
class Subset:
    """Linears of one block that share an input."""

    layers: tuple[str, ...]
    prev_op: str | tuple[str, ...] | None  # tuple: alternatives, the first the block has; "linear:part": its rows
    inspect: str
    scale_only: tuple[str, ...] = ()  # read the same input, take AWQ's s, never quantized (MoE routers)
    stage: int = 0  # set by ModelSpec.block_subsets: the registry entry the subset was expanded from


@dataclass(frozen=True)
class Fused:
    """A Linear whose output rows are several logical outputs.

    layouts: ``qkv_concat`` = [q | k | v]; ``qkv_grouped`` = per kv group [q heads of the group, k, v]
    (Bloom, Falcon, StarCoder, InternLM2; with one kv group it equals qkv_concat); ``halves`` = [gate | up].
    ``tpu_split``: TPU-MLIR's llm_convert cuts it into its parts and quantizes each part as a Linear.
    """

    linear: str
    layout: str
    tpu_split: bool = False

    @property
    def parts(self) -> tuple[str, ...]:
        return ("gate", "up") if self.layout == "halves" else ("q", "k", "v")


@dataclass(frozen=True)
class FusedExperts:
    """transformers 5 stores a block's experts as 3-D parameters ``gate_up_proj [E, 2I, H]`` (gate rows
    first) and ``down_proj [E, H, I]`` at ``path``; at load time they become Linears ``path.{e}.<name>``."""

    path: str = "mlp.experts"
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


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
    llm_convert_float: bool = True  # ... and quantizes it from float weights (False: only a GPTQ checkpoint, MoE)
    aliases: tuple[str, ...] = field(default=())
    # VLMs: the vision tower and projector modules (float unless quant.quant_objects has vision), and
    # whether the language blocks' subsets come from text_config.model_type (Llava, InternVL)
    vision: tuple[str, ...] = field(default=())
    text_from_config: bool = False
    fused: tuple[Fused, ...] = ()
    norm_offset: float = 0.0  # the norm multiplies by (offset + weight): Gemma 1
    experts: FusedExperts | None = None
    remote_code: bool = False  # only the model folder's own modeling code runs it (model.trust_remote_code)
    # in-memory name -> checkpoint name (regex, replacement) where transformers renames on load (Mixtral)
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    notes: str = ""  # what is special, for the Models table

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Every quantized Linear of a block, in execution order (expert templates unexpanded)."""
        return tuple(name for subset in self.subsets for name in subset.layers)

    def block_subsets(self, block: nn.Module) -> tuple[Subset, ...]:
        """The subsets of one block: experts expanded, prev_op alternatives resolved, absent entries dropped.

        An entry applies when the block has all its layers (DeepSeek-V2's dense first layers and MoE
        layers, Qwen2-MoE's ``mlp_only_layers``); every entry's expansions share its ``stage``."""
        out = []
        for stage, entry in enumerate(self.subsets):
            for e in _expert_ids(block, entry.layers[0]):
                layers = tuple(_fill(n, e) for n in entry.layers)
                if not all(_has(block, n) for n in layers):
                    continue
                prev = entry.prev_op if isinstance(entry.prev_op, tuple) else (entry.prev_op,)
                prev_op = next((p for p in (_fill(a, e) for a in prev if a) if _has(block, p.split(":")[0])), None)
                out.append(Subset(layers, prev_op, _fill(entry.inspect, e),
                                  tuple(n for n in entry.scale_only if _has(block, n)), stage))
        return tuple(out)

    def block_linear_names(self, block: nn.Module) -> tuple[str, ...]:
        """Every quantized Linear of this block (experts expanded)."""
        return tuple(name for subset in self.block_subsets(block) for name in subset.layers)

    def fused_of(self, linear: str) -> Fused | None:
        return next((f for f in self.fused if f.linear == linear), None)


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
    except AttributeError:
        return False
    return True


def _fill(name: str, e: int | None) -> str:
    return name if e is None else name.replace(EXPERT, str(e))


def _expert_ids(block: nn.Module, name: str) -> list[int | None]:
    if EXPERT not in name:
        return [None]
    container = name.split("." + EXPERT)[0]
    return list(range(len(block.get_submodule(container)))) if _has(block, container) else []


def attention_geometry(config: Any) -> tuple[int, int, int]:
    """(heads, kv heads, head dim) from a config, whatever the family calls them."""
    cfg = getattr(config, "text_config", None) or config
    heads = next(getattr(cfg, a) for a in ("num_attention_heads", "n_head", "num_heads") if getattr(cfg, a, None))
    if getattr(cfg, "new_decoder_architecture", False):  # Falcon-40B/180B
        kv = cfg.num_kv_heads
    elif getattr(cfg, "multi_query", False):  # Falcon-7B, StarCoder: one kv head
        kv = 1
    elif getattr(cfg, "multi_query_attention", False):  # ChatGLM
        kv = cfg.multi_query_group_num
    else:
        kv = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = next(getattr(cfg, a) for a in ("hidden_size", "n_embd", "d_model") if getattr(cfg, a, None))
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "kv_channels", None) or hidden // heads
    return heads, kv, head_dim


def part_rows(fused: Fused, part: str, out_features: int, config: Any) -> list[int]:
    """The output rows of one part of a fused Linear, in the order the next op reads them."""
    if fused.layout == "halves":
        half = out_features // 2
        return list(range(half)) if part == "gate" else list(range(half, out_features))
    heads, kv, d = attention_geometry(config)
    if fused.layout == "qkv_concat":
        start = {"q": 0, "k": heads * d, "v": (heads + kv) * d}[part]
        return list(range(start, start + (heads if part == "q" else kv) * d))
    per = heads // kv  # qkv_grouped: [kv groups, per q heads + k + v, d]
    stride = (per + 2) * d
    offset, size = {"q": (0, per * d), "k": (per * d, d), "v": ((per + 1) * d, d)}[part]
    return [g * stride + offset + i for g in range(kv) for i in range(size)]


LLAMA_ATTENTION = (
    Subset(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "self_attn"),
    Subset(("self_attn.o_proj",), "self_attn.v_proj", "self_attn.o_proj"),
)
LLAMA_MLP = (
    Subset(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "mlp"),
    Subset(("mlp.down_proj",), "mlp.up_proj", "mlp.down_proj"),
)
LLAMA_SUBSETS = LLAMA_ATTENTION + LLAMA_MLP
_GELU = None  # prev_op of a Linear behind a GELU: no op can take 1/s exactly, AWQ leaves it unscaled


def _moe(router: tuple[str, ...], shared: str | None, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
         experts: str = "mlp.experts") -> tuple[Subset, ...]:
    """MoE MLP subsets: every expert's gate/up (and the shared expert's) scaled jointly behind the norm with
    the routers, each expert's down behind its own up. Inspect: the whole MoE block (routing included)."""
    gate, up, down = (f"{experts}.{EXPERT}.{n}" for n in names)
    subsets = [Subset((gate, up), "post_attention_layernorm", "mlp", router)]
    if shared:
        subsets.append(Subset((f"{shared}.gate_proj", f"{shared}.up_proj"), "post_attention_layernorm", "mlp", router))
    subsets.append(Subset((down,), up, down))
    if shared:
        subsets.append(Subset((f"{shared}.down_proj",), f"{shared}.up_proj", f"{shared}.down_proj"))
    return tuple(subsets)


_GPT_BLOCKS = dict(blocks="transformer.h", rotary=None, final_norm="transformer.ln_f")

_SPECS = (
    ModelSpec("llama", "Llama", LLAMA_SUBSETS, aliases=("Llama", "Llama2", "Llama3", "SmolLM")),
    ModelSpec("qwen2", "Qwen2", LLAMA_SUBSETS, aliases=("Qwen2", "Qwen2.5", "Qwen25"), notes="q/k/v biases"),
    ModelSpec("qwen3", "Qwen3", LLAMA_SUBSETS, aliases=("Qwen3",)),
    ModelSpec("mistral", "Mistral", LLAMA_SUBSETS, llm_convert=False, aliases=("Mistral",)),
    ModelSpec("minicpm", "MiniCPM", LLAMA_SUBSETS, remote_code=True, aliases=("MiniCPM",),
              notes="remote code; Llama layout"),
    ModelSpec("stablelm", "StableLM", (
        *LLAMA_ATTENTION,
        Subset(("mlp.gate_proj", "mlp.up_proj"), ("post_attention_layernorm", "input_layernorm"), "mlp"),
        LLAMA_MLP[1],
    ), llm_convert=False, aliases=("StableLM",), notes="LayerNorm (bias folded); parallel residual variant"),
    ModelSpec("gemma2", "Gemma2", (
        *LLAMA_ATTENTION,
        Subset(("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm", "mlp"),
        LLAMA_MLP[1],
    ), norm_offset=1.0, llm_convert=False, aliases=("Gemma2",), notes="(1 + weight) RMSNorm"),
    ModelSpec("phi", "Phi", (
        Subset(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", "self_attn"),
        Subset(("self_attn.dense",), "self_attn.v_proj", "self_attn.dense"),
        Subset(("mlp.fc1",), "input_layernorm", "mlp"),
        Subset(("mlp.fc2",), _GELU, "mlp.fc2"),
    ), final_norm="model.final_layernorm", llm_convert=False, aliases=("Phi", "Phi2"),
              notes="parallel attention/MLP; LayerNorm; biases"),
    ModelSpec("phi3", "Phi3", (
        Subset(("self_attn.qkv_proj",), "input_layernorm", "self_attn"),
        Subset(("self_attn.o_proj",), "self_attn.qkv_proj:v", "self_attn.o_proj"),
        Subset(("mlp.gate_up_proj",), "post_attention_layernorm", "mlp"),
        Subset(("mlp.down_proj",), "mlp.gate_up_proj:up", "mlp.down_proj"),
    ), fused=(Fused("self_attn.qkv_proj", "qkv_concat", tpu_split=True), Fused("mlp.gate_up_proj", "halves", tpu_split=True)),
              qk_layers=("self_attn.qkv_proj",), aliases=("Phi3", "Phi3.5"), notes="fused qkv_proj, gate_up_proj"),
    ModelSpec("bloom", "Bloom", (
        Subset(("self_attention.query_key_value",), "input_layernorm", "self_attention"),
        Subset(("self_attention.dense",), "self_attention.query_key_value:v", "self_attention.dense"),
        Subset(("mlp.dense_h_to_4h",), "post_attention_layernorm", "mlp"),
        Subset(("mlp.dense_4h_to_h",), _GELU, "mlp.dense_4h_to_h"),
    ), embeddings=("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
              fused=(Fused("self_attention.query_key_value", "qkv_grouped"),), qk_layers=("self_attention.query_key_value",),
              llm_convert=False, aliases=("Bloom",), notes="fused per-head query_key_value; LayerNorm; ALiBi; biases",
              **_GPT_BLOCKS),
    ModelSpec("gpt_bigcode", "StarCoder", (
        Subset(("attn.c_attn",), "ln_1", "attn"),
        Subset(("attn.c_proj",), "attn.c_attn:v", "attn.c_proj"),
        Subset(("mlp.c_fc",), "ln_2", "mlp"),
        Subset(("mlp.c_proj",), _GELU, "mlp.c_proj"),
    ), embeddings=("transformer.wte", "transformer.wpe"), fused=(Fused("attn.c_attn", "qkv_grouped"),),
              qk_layers=("attn.c_attn",), llm_convert=False, aliases=("Starcoder", "GPTBigCode"),
              notes="fused multi-query c_attn; LayerNorm; biases", **_GPT_BLOCKS),
    ModelSpec("opt", "OPT", (
        Subset(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn_layer_norm", "self_attn"),
        Subset(("self_attn.out_proj",), "self_attn.v_proj", "self_attn.out_proj"),
        Subset(("fc1",), "final_layer_norm", "fc1"),
        Subset(("fc2",), "fc1", "fc2"),  # ReLU: relu(x / s) = relu(x) / s for s > 0
    ), blocks="model.decoder.layers", embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
              rotary=None, final_norm="model.decoder.final_layer_norm", llm_convert=False, aliases=("OPT",),
              notes="LayerNorm; biases; pre-norm variants only (not OPT-350M)"),
    ModelSpec("falcon", "Falcon", (
        Subset(("self_attention.query_key_value",), ("ln_attn", "input_layernorm"), "self_attention"),
        Subset(("self_attention.dense",), "self_attention.query_key_value:v", "self_attention.dense"),
        Subset(("mlp.dense_h_to_4h",), ("ln_mlp", "post_attention_layernorm", "input_layernorm"), "mlp"),
        Subset(("mlp.dense_4h_to_h",), _GELU, "mlp.dense_4h_to_h"),
    ), embeddings=("transformer.word_embeddings",), rotary="transformer.rotary_emb",
              fused=(Fused("self_attention.query_key_value", "qkv_grouped"),), qk_layers=("self_attention.query_key_value",),
              llm_convert=False, aliases=("Falcon",), notes="parallel attention/MLP; fused query_key_value; LayerNorm",
              blocks="transformer.h", final_norm="transformer.ln_f"),
    ModelSpec("internlm2", "InternLM2", (
        Subset(("attention.wqkv",), "attention_norm", "attention"),
        Subset(("attention.wo",), "attention.wqkv:v", "attention.wo"),
        Subset(("feed_forward.w1", "feed_forward.w3"), "ffn_norm", "feed_forward"),
        Subset(("feed_forward.w2",), "feed_forward.w3", "feed_forward.w2"),
    ), embeddings=("model.tok_embeddings",), rotary=None, lm_head="output",
              fused=(Fused("attention.wqkv", "qkv_grouped"),), qk_layers=("attention.wqkv",), llm_convert=False,
              remote_code=True, aliases=("InternLM2", "InternLM2.5"), notes="remote code; fused grouped wqkv"),
    ModelSpec("chatglm", "ChatGLM", (
        Subset(("self_attention.query_key_value",), "input_layernorm", "self_attention"),
        Subset(("self_attention.dense",), "self_attention.query_key_value:v", "self_attention.dense"),
        Subset(("mlp.dense_h_to_4h",), "post_attention_layernorm", "mlp"),
        Subset(("mlp.dense_4h_to_h",), "mlp.dense_h_to_4h:up", "mlp.dense_4h_to_h"),
    ), blocks="transformer.encoder.layers", embeddings=("transformer.embedding.word_embeddings",),
              rotary="transformer.rotary_pos_emb", final_norm="transformer.encoder.final_layernorm",
              lm_head="transformer.output_layer",
              fused=(Fused("self_attention.query_key_value", "qkv_concat", tpu_split=True),
                     Fused("mlp.dense_h_to_4h", "halves", tpu_split=True)),
              qk_layers=("self_attention.query_key_value",), remote_code=True, aliases=("ChatGLM", "ChatGLM3"),
              notes="remote code; fused query_key_value, dense_h_to_4h"),
    ModelSpec("qwen", "Qwen", (
        Subset(("attn.c_attn",), "ln_1", "attn"),
        Subset(("attn.c_proj",), "attn.c_attn:v", "attn.c_proj"),
        Subset(("mlp.w2", "mlp.w1"), "ln_2", "mlp"),  # w2 is the gate (SiLU), w1 the up projection
        Subset(("mlp.c_proj",), "mlp.w1", "mlp.c_proj"),
    ), embeddings=("transformer.wte",), rotary="transformer.rotary_emb", fused=(Fused("attn.c_attn", "qkv_concat"),),
              qk_layers=("attn.c_attn",), llm_convert=False, remote_code=True, aliases=("Qwen1", "QWen"),
              notes="remote code; fused c_attn", blocks="transformer.h", final_norm="transformer.ln_f"),
    ModelSpec("qwen2_moe", "Qwen2-MoE", (
        *LLAMA_ATTENTION, *LLAMA_MLP,  # dense layers (mlp_only_layers)
        *_moe(("mlp.gate", "mlp.shared_expert_gate"), "mlp.shared_expert"),
    ), experts=FusedExperts(), llm_convert_float=False, aliases=("Qwen2Moe", "Qwen1.5-MoE"),
              notes="MoE: shared expert + gate"),
    ModelSpec("qwen3_moe", "Qwen3-MoE", (*LLAMA_ATTENTION, *LLAMA_MLP, *_moe(("mlp.gate",), None)),
              experts=FusedExperts(), llm_convert=False, aliases=("Qwen3Moe",), notes="MoE"),
    ModelSpec("mixtral", "Mixtral", (*LLAMA_ATTENTION, *_moe(("mlp.gate",), None, ("w1", "w3", "w2"))),
              experts=FusedExperts(names=("w1", "w3", "w2")), checkpoint_renames=((r"\.mlp\.", ".block_sparse_moe."),),
              llm_convert=False, aliases=("Mixtral",), notes="MoE"),
    ModelSpec("deepseek_v2", "DeepSeek-V2", (
        Subset(("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"), "input_layernorm", "self_attn"),
        Subset(("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), "input_layernorm", "self_attn"),
        Subset(("self_attn.q_b_proj",), "self_attn.q_a_layernorm", "self_attn.q_b_proj"),
        Subset(("self_attn.kv_b_proj",), "self_attn.kv_a_layernorm", "self_attn.kv_b_proj"),
        Subset(("self_attn.o_proj",), None, "self_attn.o_proj"),  # v is interleaved with k_nope in kv_b_proj
        *LLAMA_MLP,  # the first_k_dense_replace dense layers
        *_moe(("mlp.gate",), "mlp.shared_experts"),
    ), experts=FusedExperts(), qk_layers=("self_attn.q_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa"),
              llm_convert=False, aliases=("DeepseekV2", "DeepSeek-V2-Lite"), notes="MoE: shared experts; MLA attention"),
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


def models_table_markdown() -> str:
    """The README's Models table, generated from the registry (tests/test_families.py keeps README in sync)."""
    rows = ["| family | model_type | RTN | AWQ | GPTQ | TPU-MLIR | notes |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for spec in _SPECS:
        ok = "yes*" if spec.remote_code else "yes"
        if not spec.llm_convert:
            tpu = "ONNX path only"
        else:
            tpu = f"`llm_convert` ({spec.model_type})" + ("" if spec.llm_convert_float else ", GPTQ checkpoint only")
        names: dict[str, str] = {}
        for name in (spec.display_name, *spec.aliases):
            names.setdefault(_key(name), name)
        rows.append(f"| {', '.join(names.values())} | `{spec.model_type}` | {ok} | {ok} | {ok} | {tpu} | {spec.notes} |")
    return "\n".join(rows) + "\n"
