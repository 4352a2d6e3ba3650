"""The config schema: sections and keys of llmc/llmc-tpu, each with its default.

Key names follow the anchor (base, model, calib, eval, quant, save, run) so that
llmc-tpu configs keep working; unknown keys are errors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EvalPos = Literal["pretrain", "transformed", "fake_quant"]
CHIPS = ("bm1684x", "bm1688", "cv186x")


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class BaseSection(Section):
    seed: int = 42


class ModelSection(Section):
    path: str = Field(description="local Hugging Face folder or hub id")
    type: str | None = Field(None, description="Llama, Qwen2, ... or an HF model_type; read from config.json when left out")
    tokenizer_mode: Literal["fast", "slow"] = "fast"
    torch_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    trust_remote_code: bool = False


class CalibSection(Section):
    name: str | None = Field(None, description="pileval, wikitext2, c4, ptb, custom_txt, custom_mm (VLM); default by method")
    download: bool = False
    path: str | None = None
    n_samples: int = Field(128, gt=0)
    bs: int = Field(-1, description="-1: all samples in one batch")
    seq_len: int = Field(512, gt=0)
    preproc: str | None = Field(None, description="pileval_awq, wikitext2_gptq, c4_gptq, ptb_gptq, random_truncate_txt")
    seed: int | None = Field(None, description="defaults to base.seed")
    padding: bool = False
    apply_chat_template: bool = False
    add_answer: bool = False
    min_pixels: int | None = Field(None, gt=0, description="VLM image size floor (Qwen-VL); default 4*28*28")
    max_pixels: int | None = Field(None, gt=0, description="VLM image size cap (Qwen-VL); default 256*28*28, fits 24 GB")


class EvalSection(Section):
    eval_pos: list[EvalPos] = Field(default_factory=lambda: ["pretrain", "transformed", "fake_quant"])
    type: Literal["ppl"] = "ppl"
    name: str | list[str] = "wikitext2"
    download: bool = False
    path: str | list[str] | None = None
    bs: int = Field(1, gt=0)
    seq_len: int = Field(2048, gt=0)
    inference_per_block: bool = False
    eval_token_consist: bool = Field(False, description="also report how often fake_quant's argmax token equals pretrain's")


class WeightSection(Section):
    bit: Literal[4, 8] = 4
    symmetric: bool = False
    granularity: Literal["per_group", "per_channel"] = "per_group"
    group_size: int = 64
    calib_algo: Literal["minmax"] = Field("minmax", description="TPU-MLIR's RTN grid is min/max; no other")


class AwqSpecial(Section):
    trans: bool = True
    trans_version: Literal["v1", "v2"] = "v2"
    weight_clip: bool = True
    clip_sym: bool = True
    n_grid: int = Field(20, gt=1, description="ratios tried by the scale search (and clip grid density)")
    max_shrink: float = Field(0.5, gt=0, lt=1, description="the clip search tries factors down to 1 - max_shrink")
    gqa_o_proj: Literal["skip", "repeat"] = Field(
        "skip", description="o_proj when kv heads < heads: skip (original AWQ) or scale with s repeated over the kv groups")
    clip_qk: bool = Field(False, description="also clip q/k projections (the anchor skips them)")
    chunk_tokens: int = Field(16384, gt=0, description="tokens per forward in the searches (memory bound)")


class GptqSpecial(Section):
    # Columns are solved in descending Hessian-diagonal order with the groups fixed up front: TPU-MLIR reads no
    # g_idx, and static groups keep every group's natural columns, so act-order costs nothing at run time. On
    # SmolLM2-135M (three calibration seeds) act-order closes 77/73% of the RTN-to-float gap, the natural order
    # 72/62%, and 75/68% with its default 3 sweeps of coordinate descent on the codes (docs/gptq.md).
    actorder: bool = Field(True, description="solve columns in descending activation order (needs static_groups)")
    static_groups: bool = Field(True, description="group scales/zeros from the original weights, before the solve")
    percdamp: float = Field(0.01, gt=0)
    blocksize: int = Field(128, gt=0)
    true_sequential: bool = True
    token_clip: float = Field(10.0, ge=0, description="Hessian statistics: tokens above token_clip x their sequence's median "
                              "squared norm (attention sinks' massive activations) are scaled down to it; 0 keeps them")
    sink_weight: float = Field(16.0, ge=1, description="Hessian statistics: the first token of each calibration sequence "
                               "(the attention sink every query reads) counts as sink_weight tokens; 1 counts it once")
    refine_sweeps: int | None = Field(None, ge=0, description="sweeps of coordinate descent on the codes after the "
                                      "solve (grid kept); left out: 3 in natural order (actorder: False), 0 after act-order")


class RtnSpecial(Section):
    pass


class SignRoundSpecial(Section):
    """Rounding offsets and min/max shrink per group, learned by signed gradient descent on each block's output."""

    iters: int = Field(50, ge=0, description="optimizer steps per block (0: TPU-MLIR's RTN codes)")
    lr: float | None = Field(None, gt=0, description="step size; default 1 / iters")
    lr_decay: bool = Field(True, description="step size decays linearly to 0")
    batch_size: int = Field(32, gt=0, description="calibration samples per step")
    min_max_tune: bool = Field(True, description="also learn the groups' min/max shrink (else rounding only)")
    seed: int = Field(0, description="sample order; block i uses seed + i")


class AwqGptqSpecial(AwqSpecial, GptqSpecial):
    """Awq+GPTQ: AWQ's scales and clipping on the float weights, then GPTQ's codes on the result."""


class AwqSignRoundSpecial(AwqSpecial, SignRoundSpecial):
    """Awq+SignRound: AWQ's scales and clipping on the float weights, then SignRound's codes on the result."""


SPECIALS: dict[str, type[Section]] = {"RTN": RtnSpecial, "Awq": AwqSpecial, "GPTQ": GptqSpecial,
                                      "SignRound": SignRoundSpecial, "Awq+GPTQ": AwqGptqSpecial,
                                      "Awq+SignRound": AwqSignRoundSpecial}
# methods that choose the integer codes themselves: their handoff is a GPTQ checkpoint (gptq_tpu_model/)
CODE_METHODS = ("GPTQ", "SignRound")


def chooses_codes(method: str) -> bool:
    """Whether a (validated) quant.method ends with a method that picks its own codes."""
    return method.split("+")[-1] in CODE_METHODS


class QuantSection(Section):
    method: str | list[str] = Field(description="RTN, Awq, GPTQ, SignRound (any case), or a combination: [Awq, GPTQ], "
                                    "[Awq, SignRound] (also written 'Awq+GPTQ')")
    weight: WeightSection = Field(default_factory=WeightSection)
    special: dict[str, Any] = Field(default_factory=dict)
    quant_out: bool = False
    quant_objects: list[Literal["language", "vision"]] = Field(default_factory=lambda: ["language"])


class SaveSection(Section):
    save_path: str
    save_trans: bool = True
    save_fake: bool = False
    save_onnx: bool = Field(False, description="ONNX pieces + compile.sh for model_transform.py / model_deploy.py")
    save_vllm: bool = False
    save_sgl: bool = False
    save_autoawq: bool = False
    save_gptq: bool = False
    gptq_checkpoint_format: Literal["gptq", "gptq_v2"] = Field(
        "gptq", description="save_gptq's zero-point convention: gptq (v1, stores zero - 1) or gptq_v2 (as is)")
    save_lightllm: bool = False
    save_mlcllm: bool = False
    save_trtllm: bool = False


class RunSection(Section):
    task_name: str = "llmc_tpu"
    task_type: Literal["LLM", "VLM"] = "LLM"
    chip: Literal["bm1684x", "bm1688", "cv186x"] = "bm1684x"
    tpu_dtype: Literal["bf16", "f16"] = Field("bf16", description="activation dtype on the TPU: W*BF16 or W*F16")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:N")
    device_memory_gib: float | None = Field(
        None, gt=0, description="GPU memory this run may use, in GiB (per process), enforced by PyTorch's allocator; "
                                "micro-batches and where the block inputs live are sized from it (default: the GPU's "
                                "free memory)")
    seq_length: int = Field(512, gt=0, description="max sequence length of the deployed model (llm_convert.py -s)")


class RunConfig(Section):
    base: BaseSection = Field(default_factory=BaseSection)
    model: ModelSection
    calib: CalibSection = Field(default_factory=CalibSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    quant: QuantSection
    save: SaveSection
    run: RunSection = Field(default_factory=RunSection)
