"""Load a causal LM and its tokenizer on the CPU, from safetensors only."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmc_tpu.models.experts import unfuse_experts
from llmc_tpu.models.registry import ModelSpec, find_spec, supported_names

log = logging.getLogger(__name__)


UNSUPPORTED_HINTS = {  # families users ask for that load another way
    "internvl_chat": ". InternVL's remote-code layout (internvl_chat) is not loaded; use its transformers-native "
                     "checkpoint (the OpenGVLab '-hf' repos, model_type internvl)",
}


class ModelLoadError(RuntimeError):
    """The model folder or hub id cannot be used; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: ModelSpec
    path: Path  # local folder (hub ids resolved through the HF cache)
    model_type: str
    processor: Any = None  # VLMs: a models.vlm.VlmProcessor (tokenizer, image processor, chat template)


def resolve_model_path(path_or_id: str) -> Path:
    """A local folder as is; otherwise a hub id resolved through the usual HF cache."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelLoadError(f"model.path {path_or_id!r} is a file; give the model folder (with config.json)")
    looks_like_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~"))
    if not looks_like_id:
        raise ModelLoadError(f"model.path {path_or_id!r}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]))
    except Exception as exc:  # offline, unknown repo, gated model: one clear line
        raise ModelLoadError(
            f"model.path {path_or_id!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); download it first or give a local folder"
        ) from None


def read_model_type(folder: Path) -> str:
    cfg_file = folder / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{folder}: no config.json (is this a Hugging Face model folder?)") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_file}: not valid JSON ({exc})") from None
    model_type = cfg.get("model_type")
    if not model_type:
        raise ModelLoadError(f"{cfg_file}: has no model_type")
    return model_type


def resolve_spec(folder: Path, declared_type: str | None) -> tuple[ModelSpec, str]:
    """The registry entry for a model folder; checks model.type against config.json."""
    model_type = read_model_type(folder)
    spec = find_spec(model_type)
    if spec is None:
        raise ModelLoadError(
            f"model_type {model_type!r} (config.json) is not supported; supported: {', '.join(supported_names())}"
            + UNSUPPORTED_HINTS.get(model_type, "")
        )
    if spec.text_from_config:  # Llava / InternVL: the language blocks are those of text_config's family
        text_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("text_config", {}).get("model_type", "llama")
        text_spec = find_spec(text_type)
        if text_spec is None or text_spec.vision:
            raise ModelLoadError(f"{model_type} with a {text_type!r} language model is not supported; language models "
                                 f"supported: {', '.join(n for n in supported_names() if not find_spec(n).vision)}")
        paths = ("model_type", "display_name", "blocks", "embeddings", "rotary", "final_norm", "lm_head", "aliases",
                 "vision", "text_from_config")
        spec = dataclasses.replace(text_spec, llm_convert=spec.llm_convert and text_spec.llm_convert,
                                   **{k: getattr(spec, k) for k in paths})
    if declared_type is not None:
        declared = find_spec(declared_type)
        if declared is None:
            raise ModelLoadError(f"model.type {declared_type!r} is unknown; supported: {', '.join(supported_names())} (or leave it out)")
        if declared.model_type != spec.model_type:
            raise ModelLoadError(
                f"model.type {declared_type!r} does not match config.json's model_type {model_type!r}; fix it or leave it out"
            )
    return spec, model_type


def check_remote_code(folder: Path, spec: ModelSpec, trust_remote_code: bool) -> None:
    """A family that only the model folder's own Python code implements runs only when the config allows it."""
    if not spec.remote_code:
        return
    if not trust_remote_code:
        raise ModelLoadError(
            f"{spec.display_name} (model_type {spec.model_type!r}) has no implementation in transformers: it runs the "
            f"Python modeling code shipped in {folder}. Read that code, then set model.trust_remote_code: true to allow it")
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "AutoModelForCausalLM" not in (cfg.get("auto_map") or {}):
        raise ModelLoadError(f"{folder}/config.json: {spec.display_name} needs remote code, but its auto_map names no "
                             "AutoModelForCausalLM (copy the modeling_*.py files and config.json of the original release)")


def load_model(path_or_id: str, declared_type: str | None = None, torch_dtype: str = "auto",
               tokenizer_mode: str = "fast", trust_remote_code: bool = False, min_pixels: int | None = None,
               max_pixels: int | None = None, on_tokenizer: Callable[[Any, ModelSpec], None] | None = None,
               ) -> LoadedModel:
    """Load on the CPU from safetensors (never unpickled weights); a VLM with its processor (image size limits).

    The tokenizer is loaded first: ``on_tokenizer(tokenizer, spec)`` is called with it before the model is built,
    so that the caller can tokenize in a thread while the model loads (mostly imports, which hold the interpreter;
    the tokenizer's own work does not). Only a VLM's processor reads the tokenizer here after that.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    folder = resolve_model_path(path_or_id)
    spec, model_type = resolve_spec(folder, declared_type)
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(f"{folder}: no *.safetensors weights (pickled .bin weights are not loaded, for safety)")
    check_remote_code(folder, spec, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=tokenizer_mode == "fast", trust_remote_code=trust_remote_code)
    if on_tokenizer is not None:
        on_tokenizer(tokenizer, spec)
    dtype = "auto" if torch_dtype == "auto" else getattr(torch, torch_dtype)
    auto_class = AutoModelForImageTextToText if spec.vision else AutoModelForCausalLM
    model = auto_class.from_pretrained(
        folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, device_map=None
    )
    model.eval()
    model.config.use_cache = False
    unfuse_experts(model, spec)  # MoE: one Linear per expert (saved back in transformers' layout)
    processor = None
    if spec.vision:
        from llmc_tpu.models.vlm import VlmError, load_processor

        try:
            processor = load_processor(folder, model_type, model.config, tokenizer, min_pixels, max_pixels)
        except VlmError as exc:
            raise ModelLoadError(str(exc)) from None
    log.info("loaded %s (%s, %s) from %s", spec.display_name, model_type, next(model.parameters()).dtype, folder)
    return LoadedModel(model, tokenizer, spec, folder, model_type, processor)
