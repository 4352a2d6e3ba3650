"""A VLM's processor, built from the model folder's files: tokenizer, image processor, chat template.

transformers' own processor classes are not used: some of them (Qwen2-VL) cannot be built
without torchvision. The one family-specific step, how many placeholder tokens an image takes
in the prompt, is a small rule per model type (``_EXPAND``), read from the image processor's
output and the model config, as the processors do.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("llmc_tpu")

# Qwen2-VL's default limits let one image take 16k tokens; these fit a 24 GB GPU (llmc-tpu's choice).
DEFAULT_MAX_PIXELS = 256 * 28 * 28
DEFAULT_MIN_PIXELS = 4 * 28 * 28


class VlmError(RuntimeError):
    """A VLM folder whose processor files cannot be used; the message says which and why."""


def _qwen_tokens(inputs: dict[str, Any], i: int, config, ip) -> int:
    return int(inputs["image_grid_thw"][i].prod()) // ip.merge_size**2


def _llava_tokens(inputs: dict[str, Any], i: int, config, ip) -> int:
    h, w = inputs["pixel_values"][i].shape[-2:]
    patch = config.vision_config.patch_size
    # CLIP-like towers add a CLS token; the "default" strategy drops it, "full" keeps it
    return (h // patch) * (w // patch) + (1 if config.vision_feature_select_strategy == "full" else 0)


def _internvl_tokens(inputs: dict[str, Any], i: int, config, ip) -> int:
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    size, patch = (size[0] if isinstance(size, (list, tuple)) else size), (patch[0] if isinstance(patch, (list, tuple)) else patch)
    per_tile = int((size // patch) ** 2 * config.downsample_ratio**2)
    return per_tile * int(inputs["num_patches"][i])


@dataclass(frozen=True)
class ImageRule:
    """How one model type writes an image into the prompt."""

    placeholder: str  # what the chat template writes for one image
    token: str  # the token repeated once per image embedding
    n_tokens: Callable[[dict[str, Any], int, Any, Any], int]
    wrap: tuple[str, str] = ("", "")  # written around the repeated tokens (InternVL: <img> ... </img>)
    mm_token_type_ids: bool = False  # Qwen-VL's M-RoPE needs the image-token mask
    image_kwargs: tuple[str, ...] = ()  # extra image-processor outputs the model takes


_QWEN = ImageRule("<|image_pad|>", "<|image_pad|>", _qwen_tokens, mm_token_type_ids=True, image_kwargs=("image_grid_thw",))
_EXPAND: dict[str, ImageRule] = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "llava": ImageRule("<image>", "<image>", _llava_tokens),
    "internvl": ImageRule("<IMG_CONTEXT>", "<IMG_CONTEXT>", _internvl_tokens, wrap=("<img>", "</img>")),
}
# Without a chat template a prompt still needs each family's image markers around the placeholder
_PLAIN_IMAGE = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
                "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


def read_chat_template(folder: Path, tokenizer) -> str | None:
    """The processor's chat template (chat_template.jinja / .json / processor_config.json), else the tokenizer's."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        f = folder / name
        if f.is_file():
            try:
                tmpl = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
            except (json.JSONDecodeError, AttributeError) as exc:
                raise VlmError(f"{f}: not valid JSON ({exc})") from None
            if tmpl:
                return tmpl
    return getattr(tokenizer, "chat_template", None)


@dataclass
class VlmProcessor:
    """Turns (images, question, answer) into model inputs for one VLM family."""

    model_type: str
    tokenizer: Any
    image_processor: Any
    config: Any
    chat_template: str | None
    settings: dict[str, Any] = field(default_factory=dict)  # image size limits actually applied, for the report

    @property
    def rule(self) -> ImageRule:
        return _EXPAND[self.model_type]

    def prompt(self, question: str, n_images: int, answer: str | None, chat: bool) -> tuple[str, str]:
        """(prefix, answer part): the prompt up to the answer, and the answer text that follows it."""
        if chat:
            if not self.chat_template:
                raise VlmError("calib.apply_chat_template is set but the model folder has no chat template "
                               "(chat_template.jinja, chat_template.json or the tokenizer's)")
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
            prefix = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=self.chat_template,
                                                        tokenize=False, add_generation_prompt=True)
            return prefix, answer or ""
        image = _PLAIN_IMAGE.get(self.model_type, self.rule.placeholder)
        return image * n_images + question + ("\n" if answer else ""), answer or ""

    def expand(self, text: str, inputs: dict[str, Any], first: int, n_images: int) -> str:
        """Replace each image placeholder by the image's tokens (images ``first .. first+n_images-1`` of ``inputs``)."""
        parts = text.split(self.rule.placeholder)
        if len(parts) - 1 != n_images:
            raise VlmError(f"the prompt has {len(parts) - 1} image placeholders ({self.rule.placeholder}) for {n_images} "
                           "images; check the chat template")
        out = parts[0]
        for k, part in enumerate(parts[1:]):
            n = self.rule.n_tokens(inputs, first + k, self.config, self.image_processor)
            out += self.rule.wrap[0] + self.rule.token * n + self.rule.wrap[1] + part
        return out

    def images(self, images: list) -> dict[str, Any]:
        if not images:
            return {}
        return dict(self.image_processor(images=images, return_tensors="pt"))

    def encode(self, texts: list[str], images: list[list], add_special_tokens: bool) -> dict[str, torch.Tensor]:
        """Model inputs for a batch: texts with their images' placeholders expanded, padded to the longest."""
        flat = [img for imgs in images for img in imgs]
        img_inputs = self.images(flat)
        expanded, first = [], 0
        for text, imgs in zip(texts, images):
            expanded.append(self.expand(text, img_inputs, first, len(imgs)))
            first += len(imgs)
        enc = self.tokenizer(expanded, return_tensors="pt", padding="longest", add_special_tokens=add_special_tokens)
        batch: dict[str, torch.Tensor] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if flat:
            batch["pixel_values"] = img_inputs["pixel_values"]
            for key in self.rule.image_kwargs:
                batch[key] = img_inputs[key]
        if self.rule.mm_token_type_ids:
            token_id = self.tokenizer.convert_tokens_to_ids(self.rule.token)
            batch["mm_token_type_ids"] = (enc["input_ids"] == token_id).to(torch.int32)
        return batch

    def n_tokens(self, text: str, add_special_tokens: bool) -> int:
        return len(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def load_processor(folder: Path, model_type: str, config, tokenizer, min_pixels: int | None,
                   max_pixels: int | None) -> VlmProcessor:
    """The image processor of ``folder`` (with the image size limits), its tokenizer and chat template."""
    from transformers import AutoImageProcessor

    if model_type not in _EXPAND:
        raise VlmError(f"model_type {model_type!r}: no image-prompt rule; supported VLMs: {', '.join(sorted(_EXPAND))}")
    settings: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    if _EXPAND[model_type] is _QWEN:
        settings = {"min_pixels": min_pixels or DEFAULT_MIN_PIXELS, "max_pixels": max_pixels or DEFAULT_MAX_PIXELS}
        kwargs["size"] = {"shortest_edge": settings["min_pixels"], "longest_edge": settings["max_pixels"]}
    elif min_pixels or max_pixels:
        settings = {"note": f"calib.min_pixels / max_pixels do not apply to {model_type} (fixed-size or tiled images)"}
    if not (folder / "preprocessor_config.json").is_file():
        raise VlmError(f"{folder}: no preprocessor_config.json (the image processor's settings); copy it from the "
                       "original model folder")
    try:
        image_processor = AutoImageProcessor.from_pretrained(folder, **kwargs)
    except Exception as exc:  # unknown processor type, bad JSON, missing backend
        raise VlmError(f"{folder / 'preprocessor_config.json'}: cannot build the image processor "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    settings["image_processor"] = type(image_processor).__name__
    proc = VlmProcessor(model_type, tokenizer, image_processor, config, read_chat_template(folder, tokenizer), settings)
    for token in (proc.rule.token, *(w for w in proc.rule.wrap if w)):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise VlmError(f"{folder}: the tokenizer has no {token!r} token, which {model_type} uses for images")
    return proc


def checkpoint_names(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """Module name -> the name transformers writes in a checkpoint (VLMs keep their original key layout on save)."""
    from transformers.core_model_loading import revert_weight_conversion

    out = {}
    for name in names:
        reverted = list(revert_weight_conversion(model, {f"{name}.weight": torch.empty(0)}))
        out[name] = reverted[0][: -len(".weight")] if len(reverted) == 1 and reverted[0].endswith(".weight") else name
    return out
