"""Image + text data for VLMs: a folder with ``samples.json`` and its images.

``samples.json`` is a list of objects ``{"image": path or [paths], "question": str, "answer": str}``;
paths are relative to the folder (absolute paths must point inside it); rows without ``image``
are text-only. Other keys (``category``, ``question_id`` of MME) are kept. Every error names the
file and the row (1-based) and says what is wrong. Paths that leave the folder (``../``, an
absolute path or a symlink elsewhere) are refused: a data folder must not read files outside it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmc_tpu.data.text import DataError

SAMPLES_FILE = "samples.json"
DEFAULT_CALIB = "data/VLM/cali/general_custom_data"
DEFAULT_EVAL = "data/VLM/eval/general_custom_data"
_REPO = Path(__file__).resolve().parents[2]


@dataclass
class MmSample:
    """One row of samples.json, its images resolved to files inside the data folder."""

    row: int  # 1-based
    images: list[Path]
    question: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)


def is_multimodal_folder(path: str | Path | None) -> bool:
    """A folder holding samples.json, or the samples.json file itself."""
    if path is None:
        return False
    p = Path(path).expanduser()
    return (p.is_dir() and (p / SAMPLES_FILE).is_file()) or (p.is_file() and p.name == SAMPLES_FILE)


def default_folder(relative: str) -> str:
    """A shipped default data folder: relative to the working directory, else to the repository."""
    if Path(relative).exists() or not (_REPO / relative).exists():
        return relative
    return str(_REPO / relative)


def _samples_file(path: str | Path) -> tuple[Path, Path]:
    p = Path(path).expanduser()
    if p.is_file() and p.name == SAMPLES_FILE:
        return p.parent, p
    if not p.exists():
        raise DataError(f"{p}: no such folder (a VLM data folder holds {SAMPLES_FILE} and its images)")
    if not p.is_dir():
        raise DataError(f"{p}: expected a folder with {SAMPLES_FILE} (or the {SAMPLES_FILE} file itself)")
    f = p / SAMPLES_FILE
    if not f.is_file():
        raise DataError(f"{p}: no {SAMPLES_FILE} in this folder")
    return p, f


def _image_path(folder: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: image must be a path (a string) or a list of paths, got {value!r}")
    root = folder.resolve()
    candidate = Path(value).expanduser()
    full = (candidate if candidate.is_absolute() else folder / candidate).resolve()
    if not full.is_relative_to(root):
        raise DataError(f"{where}: image {value!r} is outside the data folder {root}; refused (images must be "
                        "inside the folder that holds samples.json)")
    if not full.exists():
        raise DataError(f"{where}: image {value!r} not found ({full})")
    if not full.is_file():
        raise DataError(f"{where}: image {value!r} is not a file ({full})")
    return full


def _text(row: dict[str, Any], key: str, where: str, required: bool) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: no {key!r} (each row needs a question and an answer string)")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def load_samples(path: str | Path, need_answer: bool = True, check_images: bool = True) -> list[MmSample]:
    """Read and check samples.json (every image opened once when ``check_images``)."""
    folder, f = _samples_file(path)
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{f}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{f}: empty file (expected a JSON list of {{image, question, answer}} objects)")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{f}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(rows, list):
        raise DataError(f"{f}: expected a JSON list of {{image, question, answer}} objects, got a {type(rows).__name__}")
    if not rows:
        raise DataError(f"{f}: the list is empty (no samples)")
    samples = []
    for i, row in enumerate(rows, start=1):
        where = f"{f}, row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with image, question, answer; got {type(row).__name__}")
        question = _text(row, "question", where, required=True)
        answer = _text(row, "answer", where, required=need_answer)
        if not question.strip() and not answer.strip():
            raise DataError(f"{where}: question and answer are both empty")
        value = row.get("image")
        values = [] if value is None else value if isinstance(value, list) else [value]
        images = [_image_path(folder, v, where) for v in values]
        if check_images:
            for img, v in zip(images, values):
                open_image(img, f"{where}: image {v!r}")
        extra = {k: v for k, v in row.items() if k not in ("image", "question", "answer")}
        samples.append(MmSample(i, images, question, answer, extra))
    return samples


def open_image(path: Path, where: str):
    """The image as RGB; a file PIL cannot read is a DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{where} is not a readable image ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


@dataclass
class MmBatch:
    """A batch of model inputs and, per sample, the answer's token span (for answer perplexity)."""

    inputs: dict[str, torch.Tensor]
    answer_spans: list[tuple[int, int]]
    samples: list[MmSample]


def encode_samples(processor, samples: list[MmSample], chat: bool, add_answer: bool) -> tuple[list[dict[str, Any]], list[Any]]:
    """Per sample: its text pieces and images (not yet batched)."""
    items, images = [], []
    for s in samples:
        imgs = [open_image(p, f"row {s.row}: image {p.name}") for p in s.images]
        prefix, answer = processor.prompt(s.question, len(imgs), s.answer if add_answer else None, chat)
        items.append({"prefix": prefix, "answer": answer if add_answer else "", "sample": s})
        images.append(imgs)
    return items, images


def make_batches(processor, samples: list[MmSample], bs: int, chat: bool, add_answer: bool,
                 padding: bool) -> list[MmBatch]:
    """Batches of ``bs`` samples through the processor; answer spans index the tokens of each answer."""
    items, images = encode_samples(processor, samples, chat, add_answer)
    special = not chat  # a chat template writes its own special tokens
    out = []
    for start in range(0, len(items), bs):
        chunk, imgs = items[start:start + bs], images[start:start + bs]
        if len(chunk) > 1 and not padding:
            raise DataError(f"{len(chunk)} samples in one batch need calib.padding: True (they differ in length); "
                            "or set calib.bs: 1")
        texts = [it["prefix"] + it["answer"] for it in chunk]
        inputs = processor.encode(texts, imgs, add_special_tokens=special)
        spans = []
        for j, it in enumerate(chunk):
            # the answer's tokens: those after the prefix (both with their images expanded)
            lengths = [processor.n_tokens(processor.expand(t, processor.images(imgs[j]), 0, len(imgs[j])), special)
                       for t in (it["prefix"], texts[j])]
            pad_left = int((inputs["attention_mask"][j] == 0).sum()) if processor.tokenizer.padding_side == "left" else 0
            spans.append((pad_left + lengths[0], pad_left + lengths[1]))
        out.append(MmBatch(inputs, spans, [it["sample"] for it in chunk]))
    return out


def calibration_batches(calib, processor) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """VLM calibration (``calib.name: custom_mm``): model-input dicts of ``calib.bs`` samples each."""
    path = calib.path or default_folder(DEFAULT_CALIB)
    samples = load_samples(path, need_answer=calib.add_answer)
    rng = random.Random(calib.seed)
    order = list(range(len(samples)))
    rng.shuffle(order)
    chosen, too_long = [], 0
    for i in order:  # drop samples longer than calib.seq_len: their image tokens cannot be cut
        batch = make_batches(processor, [samples[i]], 1, calib.apply_chat_template, calib.add_answer, False)[0]
        if batch.inputs["input_ids"].shape[1] > calib.seq_len:
            too_long += 1
            continue
        chosen.append(samples[i])
        if len(chosen) == calib.n_samples:
            break
    source = Path(path) / SAMPLES_FILE if Path(path).is_dir() else Path(path)
    if not chosen:
        raise DataError(f"{source}: all {len(samples)} samples are longer than calib.seq_len {calib.seq_len} tokens "
                        "(image tokens included); raise calib.seq_len or lower calib.max_pixels")
    info: dict[str, Any] = {"name": "custom_mm", "path": str(path), "source_samples": len(samples),
                            "used_samples": len(chosen), "dropped_too_long": too_long, "seq_len": calib.seq_len,
                            "bs": calib.bs, "padding": calib.padding, "apply_chat_template": calib.apply_chat_template,
                            "add_answer": calib.add_answer, "seed": calib.seed,
                            "images": sum(len(s.images) for s in chosen), "processor": processor.settings}
    notes = []
    if too_long:
        notes.append(f"{too_long} samples dropped: longer than calib.seq_len {calib.seq_len} tokens with their image tokens")
    if len(chosen) < calib.n_samples:
        notes.append(f"calib.n_samples is {calib.n_samples} but only {len(chosen)} usable samples: all of them are used")
    if notes:
        info["notes"] = notes
    bs = len(chosen) if calib.bs == -1 else calib.bs
    batches = make_batches(processor, chosen, bs, calib.apply_chat_template, calib.add_answer, calib.padding)
    info["tokens"] = int(sum(int(b.inputs["attention_mask"].sum()) for b in batches))
    return [b.inputs for b in batches], info
