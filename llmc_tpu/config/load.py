"""Read a YAML config, validate it, fill every default."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmc_tpu.config.errors import ConfigError, Problem, did_you_mean
from llmc_tpu.config.schema import SPECIALS, RunConfig, chooses_codes
from llmc_tpu.tpu.rtn import TpuWeightFormat

METHODS = tuple(SPECIALS)
DEFAULT_CALIB = {"Awq": ("pileval", "pileval_awq"), "GPTQ": ("wikitext2", "wikitext2_gptq"), "RTN": (None, None),
                 "SignRound": ("pileval", "pileval_awq"), "Awq+GPTQ": ("wikitext2", "wikitext2_gptq"),
                 "Awq+SignRound": ("pileval", "pileval_awq")}
DEFAULT_PREPROC = {
    "pileval": "pileval_awq",
    "wikitext2": "wikitext2_gptq",
    "c4": "c4_gptq",
    "ptb": "ptb_gptq",
    "custom_txt": "random_truncate_txt",
}


def load_config(path: str | Path) -> RunConfig:
    """Load and validate a YAML config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem("--config", f"cannot read the file: {exc.strerror}", str(path))]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([Problem("(yaml)", f"{where}{getattr(exc, 'problem', exc)}", has_value=False)], str(path)) from None
    return parse_config(data, source=str(path))


def parse_config(data: Any, source: str = "config") -> RunConfig:
    """Validate a config mapping; raise ConfigError listing every problem."""
    if not isinstance(data, Mapping):
        raise ConfigError([Problem("(top level)", "expected a mapping of sections (base, model, calib, eval, quant, save, run)", data)], source)
    data = {k: ({} if v is None and k in ("base", "calib", "eval", "run") else v) for k, v in data.items()}
    problems: list[Problem] = []
    quant = data.get("quant")
    if isinstance(quant, Mapping) and "method" in quant:
        method = _normalize_method(quant["method"], problems)
        data["quant"] = dict(quant, method=method or quant["method"])
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        problems += _pydantic_problems(exc)
        raise ConfigError(problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    problems += _check_special(cfg)
    problems += _check_tpu_format(cfg)
    problems += _check_values(cfg)
    if problems:
        raise ConfigError(problems, source)
    _fill_defaults(cfg)
    return cfg


def tpu_format(cfg: RunConfig) -> TpuWeightFormat:
    """The TPU-MLIR weight format a validated config asks for."""
    w = cfg.quant.weight
    return TpuWeightFormat(
        bits=w.bit,
        group_size=0 if w.granularity == "per_channel" else w.group_size,
        symmetric=w.symmetric,
        scale_dtype="bfloat16" if cfg.run.tpu_dtype == "bf16" else "float16",
        chip=cfg.run.chip,
    )


def _normalize_method(value: Any, problems: list[Problem]) -> str | None:
    """A method name in any case, or a combination (a list, or names joined by '+'), as its canonical name."""
    by_lower = {m.lower(): m for m in METHODS}
    steps = value.split("+") if isinstance(value, str) else value if isinstance(value, list) else None
    if steps and all(isinstance(v, str) for v in steps):
        name = "+".join(by_lower.get(v.strip().lower(), v.strip()) for v in steps)
        if name.lower() in by_lower:
            return by_lower[name.lower()]
    combos = [m for m in METHODS if "+" in m]
    allowed = ", ".join(m for m in METHODS if "+" not in m) + ", or a combination: " + ", ".join(
        "[" + ", ".join(m.split("+")) + "]" for m in combos)
    shown = "+".join(map(str, value)) if isinstance(value, list) else value
    problems.append(Problem("quant.method", f"unknown method; allowed: {allowed}{did_you_mean(shown, METHODS)}", value))
    return None


def _pydantic_problems(exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _fields_at(RunConfig, loc[:-1])
            problems.append(Problem(path, f"unknown key{did_you_mean(loc[-1], allowed)}; allowed keys here: {', '.join(allowed)}", has_value=False))
        elif kind == "missing":
            problems.append(Problem(path, "required key is missing", has_value=False))
        else:
            problems.append(Problem(path, err["msg"], err.get("input")))
    return problems


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _check_special(cfg: RunConfig) -> list[Problem]:
    special_model = SPECIALS[cfg.quant.method]
    try:
        special = special_model.model_validate(cfg.quant.special or {})
        if "actorder" in special_model.model_fields and "actorder" not in special.model_fields_set \
                and not special.static_groups:  # dynamic groups asked for: the natural order (act-order needs static)
            special.actorder = False
        cfg.quant.special = special.model_dump()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            path = ".".join(["quant", "special", *loc])
            if err["type"] == "extra_forbidden":
                allowed = list(special_model.model_fields) or ["(none)"]
                problems.append(Problem(path, f"not an option of {cfg.quant.method}{did_you_mean(loc[-1], allowed)}; allowed: {', '.join(allowed)}", has_value=False))
            else:
                problems.append(Problem(path, err["msg"], err.get("input")))
        return problems
    return []


def _check_tpu_format(cfg: RunConfig) -> list[Problem]:
    """Accept only weight formats TPU-MLIR 1.30.2 can produce (docs/tpu_mlir.md)."""
    w = cfg.quant.weight
    problems = []
    if w.granularity == "per_group":
        if w.group_size <= 0:
            problems.append(Problem("quant.weight.group_size", "per_group needs a positive group size (TPU-MLIR's -g / --q_group_size, 64 by default)", w.group_size))
    else:
        if "group_size" in w.model_fields_set and w.group_size not in (-1, 0):
            problems.append(Problem("quant.weight.group_size", "per_channel takes group_size -1 (or leave it out)", w.group_size))
        if w.bit == 4 and w.symmetric:
            problems.append(Problem("quant.weight.symmetric", "TPU-MLIR's 4-bit per_channel is asymmetric only; use symmetric: False, or per_group", True))
        if w.bit == 8 and not w.symmetric:
            problems.append(Problem("quant.weight.symmetric", "TPU-MLIR's 8-bit per_channel is symmetric only; use symmetric: True, or per_group", False))
    return problems


def _check_values(cfg: RunConfig) -> list[Problem]:
    problems = []
    if cfg.calib.bs == 0 or cfg.calib.bs < -1:
        problems.append(Problem("calib.bs", "must be -1 (all samples in one batch) or a positive batch size", cfg.calib.bs))
    for key in ("save_lightllm", "save_mlcllm", "save_trtllm"):
        if getattr(cfg.save, key):
            problems.append(Problem(f"save.{key}", "this export is not available in this version; allowed exports: "
                                    "save_trans, save_fake, save_vllm, save_sgl, save_autoawq, save_gptq", True))
    if cfg.save.save_autoawq and cfg.quant.weight.bit != 4:
        problems.append(Problem("save.save_autoawq", f"AutoAWQ GEMM checkpoints are 4-bit only and quant.weight.bit is "
                                f"{cfg.quant.weight.bit}; use save_gptq or save_vllm", True))
    if cfg.save.save_onnx and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
        problems.append(Problem("save.save_onnx", "needs onnx and onnxruntime: pip install 'llmc_tpu[onnx]'", True))
    if cfg.save.save_onnx and cfg.run.task_type == "VLM":
        problems.append(Problem("save.save_onnx", "the ONNX export covers text-only models (no vision encoder); "
                                "for a VLM use llm_convert.py on transformed_model", True))
    if "vision" in cfg.quant.quant_objects and cfg.run.task_type != "VLM":
        problems.append(Problem("quant.quant_objects", "'vision' needs run.task_type: VLM", cfg.quant.quant_objects))
    if "language" not in cfg.quant.quant_objects:
        problems.append(Problem("quant.quant_objects", "must include 'language' ([language] or [vision, language])",
                                cfg.quant.quant_objects))
    if cfg.calib.name == "custom_mm" and cfg.run.task_type != "VLM":
        problems.append(Problem("calib.name", "custom_mm (images + text) needs run.task_type: VLM", "custom_mm"))
    if cfg.run.task_type == "VLM":
        for key in ("save_vllm", "save_sgl", "save_autoawq", "save_gptq"):  # save_onnx: refused above
            if getattr(cfg.save, key):
                problems.append(Problem(f"save.{key}", "not available for VLMs in this version; VLMs are saved as "
                                        "transformed_model / fake_quant_model (and gptq_tpu_model for GPTQ)", True))
    if chooses_codes(cfg.quant.method):
        problems += _check_gptq(cfg)
    w = cfg.quant.weight
    if cfg.quant.method.endswith("SignRound") and w.granularity == "per_channel" and w.bit == 8:
        problems.append(Problem("quant.weight.granularity", "SignRound does not cover W8 per channel (signed codes with "
                                "zero 0); use per_group (e.g. group_size 64), or GPTQ / RTN", "per_channel"))
    return problems


def _check_gptq(cfg: RunConfig) -> list[Problem]:
    """GPTQ hands TPU-MLIR a GPTQ checkpoint (export/gptq_checkpoint.py): refuse what it cannot carry."""
    problems = []
    sp = cfg.quant.special or {}
    if sp.get("actorder") and not sp.get("static_groups") and cfg.quant.weight.granularity == "per_group":
        problems.append(Problem("quant.special.actorder", "act-order needs quant.special.static_groups: True for the TPU "
                                "handoff (TPU-MLIR reads no g_idx, so every group must keep its natural columns); "
                                "set static_groups: True, or actorder: False", True))
    if cfg.save.save_trans and "save_trans" in cfg.save.model_fields_set:
        problems.append(Problem("save.save_trans", "GPTQ's handoff is the GPTQ checkpoint SAVE_PATH/gptq_tpu_model "
                                "(llm_convert.py -q auto keeps its codes); float weights would be re-quantized by "
                                "TPU-MLIR's RTN and lose GPTQ's codes: remove save_trans or set it False", True))
    if cfg.save.save_onnx:
        problems.append(Problem("save.save_onnx", "ONNX graphs carry float weights that model_deploy.py re-quantizes with "
                                "TPU-MLIR's RTN, so GPTQ's codes would be lost; use the GPTQ checkpoint with llm_convert.py", True))
    return problems


def _fill_defaults(cfg: RunConfig) -> None:
    if chooses_codes(cfg.quant.method) and "save_trans" not in cfg.save.model_fields_set:
        cfg.save.save_trans = False  # GPTQ writes its checkpoint instead (see _check_gptq)
    if cfg.quant.weight.granularity == "per_channel":
        cfg.quant.weight.group_size = -1
    if cfg.calib.seed is None:
        cfg.calib.seed = cfg.base.seed
    if cfg.run.task_type == "VLM":
        _fill_vlm_defaults(cfg)
    if cfg.calib.name is None:
        cfg.calib.name = DEFAULT_CALIB[cfg.quant.method][0]
    if cfg.calib.preproc is None and cfg.calib.name is not None:
        cfg.calib.preproc = DEFAULT_PREPROC.get(cfg.calib.name)


VLM_CALIB_DEFAULTS = {"n_samples": 8, "seq_len": 512, "bs": 1, "padding": True, "apply_chat_template": True,
                      "add_answer": True}


def _fill_vlm_defaults(cfg: RunConfig) -> None:
    """llmc-tpu's VLM defaults: calib general_custom_data (custom_mm, chat template, answers), eval answer ppl on
    the shipped eval folder; keys the config sets are kept."""
    from llmc_tpu.data.multimodal import DEFAULT_CALIB, DEFAULT_EVAL, default_folder

    if cfg.calib.name is None and cfg.quant.method != "RTN":
        cfg.calib.name = "custom_mm"
        if cfg.calib.path is None:
            cfg.calib.path = default_folder(DEFAULT_CALIB)
        for key, value in VLM_CALIB_DEFAULTS.items():
            if key not in cfg.calib.model_fields_set:
                setattr(cfg.calib, key, value)
    if "name" not in cfg.eval.model_fields_set:
        cfg.eval.name = "custom_ppl"
        if cfg.eval.path is None:
            cfg.eval.path = default_folder(DEFAULT_EVAL)
