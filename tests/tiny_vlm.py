"""Tiny random-weight VLMs (Qwen2-VL, Qwen2.5-VL, Llava, InternVL) with processors built offline, and images."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import make_tokenizer

# A short chat template in the shape of the real ones: content is a string or a list of
# {"type": "image"} / {"type": "text", "text": ...} parts; ``IMAGE`` is the family's image placeholder.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TEXT_KW = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64, intermediate_size=256,
               num_hidden_layers=2, max_position_embeddings=2048)
VOCAB = 320


def _tokenizer(specials: list[str]):
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.pad_token = "<|endoftext|>"
    return tok


def _scale_weights(model: torch.nn.Module) -> None:
    """Larger-than-init weights so that quantization error is visible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "position" not in name:
                p.normal_(0, 0.08)


def _save_processor(folder: Path, image_processor, tokenizer, chat_template: str) -> None:
    """The processor's files as a model folder holds them (the processor classes themselves need torchvision)."""
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


def _published_config(path: Path) -> None:
    """Rewrite a Qwen-VL config.json in the layout the published checkpoints have (transformers 4.4x: text keys at
    the top level, ``rope_scaling`` with the M-RoPE sections), which TPU-MLIR reads and transformers 5 converts."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    for key in ("model_type", "dtype", "architectures"):
        text.pop(key, None)
    cfg.update(text)
    cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    cfg["vision_config"].pop("rope_parameters", None)
    cfg["torch_dtype"] = cfg.pop("dtype", "bfloat16")
    path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def make_tiny_qwen2_vl(folder: Path, version: str = "qwen2_vl", seed: int = 0, vision_dim: int = 64) -> Path:
    """A 2-block Qwen2-VL (or Qwen2.5-VL with ``version='qwen2_5_vl'``) with its processor.

    The vision config carries ``in_chans`` / ``spatial_patch_size`` as the published configs do (TPU-MLIR reads
    them); ``vision_dim=160`` (2 heads of 80, the head size TPU-MLIR's converter assumes) compiles with llm_convert.
    """
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer(QWEN_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(TEXT_KW, vocab_size=VOCAB, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": [16, 8, 8]})
    vision = dict(depth=1, hidden_size=128, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if version == "qwen2_vl":
        cfg_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision.update(embed_dim=vision_dim, mlp_ratio=2, in_chans=3, spatial_patch_size=14)
    else:
        cfg_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision.update(hidden_size=vision_dim, out_hidden_size=128, intermediate_size=2 * vision_dim, window_size=56,
                      fullatt_block_indexes=[0], in_chans=3, spatial_patch_size=14)
    cfg = cfg_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"], bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    _scale_weights(model)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    _published_config(folder / "config.json")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    _save_processor(folder, image_processor, tok, CHAT_TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"))
    return folder


def make_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """A 2-block Llava (Llama text model, 1-layer CLIP vision tower at 28x28 pixels) with its processor."""
    import transformers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer(["<image>", "<|im_start|>", "<|im_end|>"])
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14, projection_dim=64)
    text = dict(TEXT_KW, model_type="llama", vocab_size=VOCAB)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                                   vision_feature_layer=-1, vision_feature_select_strategy="default",
                                   projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(cfg)
    _scale_weights(model)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    _save_processor(folder, image_processor, tok, CHAT_TEMPLATE.replace("IMAGE", "<image>"))
    return folder


def make_images(folder: Path, n: int = 4, size: tuple[int, int] = (56, 42)) -> list[str]:
    """``n`` small PNGs of coloured shapes in ``folder``; returns their file names."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    names = []
    for i in range(n):
        img = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(img)
        c = colours[i % len(colours)]
        if i % 2:
            draw.ellipse([4, 4, size[0] - 4, size[1] - 4], fill=c)
        else:
            draw.rectangle([6, 6, size[0] - 6, size[1] - 6], fill=c)
        name = f"img{i}.png"
        img.save(folder / name)
        names.append(name)
    return names


def make_samples(folder: Path, n: int = 4, text_only: int = 1) -> Path:
    """A samples.json data folder: ``n`` image rows (one with two images) and ``text_only`` rows without an image."""
    names = make_images(folder / "images", n)
    rows = []
    for i, name in enumerate(names):
        colour = ["red", "green", "blue", "yellow", "purple", "orange"][i % 6]
        shape = "circle" if i % 2 else "square"
        image = f"images/{name}" if i != 1 else [f"images/{name}", f"images/{names[0]}"]
        rows.append({"image": image, "question": "What is in the picture?", "answer": f"A {colour} {shape}."})
    for _ in range(text_only):
        rows.append({"question": "Say something.", "answer": "The quick brown fox jumps over the lazy dog."})
    (folder / "samples.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return folder


def make_tiny_internvl(folder: Path, seed: int = 0) -> Path:
    """A 2-block transformers-native InternVL (Qwen2 text model, 1-layer vision tower, 28x28 tiles)."""
    import transformers
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = _tokenizer(["<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>"])
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  image_size=[28, 28], patch_size=[14, 14])
    text = dict(TEXT_KW, model_type="qwen2", vocab_size=VOCAB)
    cfg = transformers.InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5,
                                      image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(cfg)
    _scale_weights(model)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    image_processor = GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True, min_patches=1,
                                               max_patches=2)
    _save_processor(folder, image_processor, tok, CHAT_TEMPLATE.replace("IMAGE", "<IMG_CONTEXT>"))
    return folder
