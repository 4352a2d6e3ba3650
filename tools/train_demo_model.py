#!/usr/bin/env python3
"""Build the embedded demo model ``data/models/shakespeare-llama`` from scratch.

The whole, reproducible recipe in one file:

  prepare  split tinyshakespeare into train (first 90%) / test (last 10%, cut at a line boundary),
           write them to data/LLM/cali/tinyshakespeare/train.txt and
           data/LLM/eval/tinyshakespeare/test.txt, train a byte-level BPE tokenizer on the train
           split (HF ``tokenizers``), tokenize both splits into WORK/*.npy
  train    train a small ``LlamaForCausalLM`` (GQA, tied embeddings, every Linear dim a multiple
           of 64) on the train ids with AdamW + warmup/cosine; evaluate the held-out perplexity
           every --eval-every steps, keep the best checkpoint, stop once it has not improved for
           --patience evaluations; write WORK/best-0000{1,2}.safetensors (fp32) + WORK/train_result.json
  export   load the best fp32 weights, save them with ``save_pretrained(safe_serialization=True)``
           in bfloat16 together with the tokenizer, re-load, measure the held-out perplexity
           (fp32 weights, bf16 weights computed in fp32, bf16 weights computed in bf16), a unigram
           baseline and a sample, and write the model folder's README.md
  all      prepare + train + export

Everything is seeded (--seed); with the same hardware and software versions the run repeats
bit for bit (torch.use_deterministic_algorithms, eager attention while training).
CUDA is used when present, else the CPU (slow, but works).

Example (the command that made the committed model; see data/models/shakespeare-llama/README.md):

  python tools/train_demo_model.py all
  # or in steps, e.g. with the training on a GPU machine:
  python tools/train_demo_model.py prepare
  python tools/train_demo_model.py train --device cuda
  python tools/train_demo_model.py export
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

# must be set before CUDA is initialised, for deterministic cuBLAS
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = Path("/work/shared/data/tinyshakespeare/input.txt")
INPUT_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_WORK = REPO / ".demo_model_work"
DEFAULT_OUT = REPO / "data/models/shakespeare-llama"
TRAIN_TXT = REPO / "data/LLM/cali/tinyshakespeare/train.txt"
TEST_TXT = REPO / "data/LLM/eval/tinyshakespeare/test.txt"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, Llama order
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ (message['role'] | upper) ~ ':\\n' ~ (message['content'] | trim) ~ '\\n\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:\\n' }}{%- endif -%}"
)
EVAL_SEQ_LEN = 256


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def set_seed(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------------------- prepare
def split_text(text: str, holdout: float) -> tuple[str, str]:
    """First (1-holdout) of the characters for training, the rest for evaluation.

    The cut is moved forward to the next line start, so both parts consist of whole lines
    and train + test == text exactly."""
    pos = int(len(text) * (1.0 - holdout))
    nl = text.find("\n", pos)
    cut = len(text) if nl < 0 else nl + 1
    return text[:cut], text[cut:]


def train_tokenizer(train_text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # one "document" per line keeps the training deterministic and independent of chunking
    tok.train_from_iterator(train_text.splitlines(keepends=True), trainer=trainer)
    return tok


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def cmd_prepare(args) -> None:
    src = Path(args.input)
    if src.exists():
        raw = src.read_bytes()
    elif TRAIN_TXT.exists() and TEST_TXT.exists():
        # no copy of input.txt here: the committed splits are the original, byte for byte
        raw = TRAIN_TXT.read_bytes() + TEST_TXT.read_bytes()
        src = TRAIN_TXT.parent
        print(f"{args.input} not found: rebuilt the text from {TRAIN_TXT} + {TEST_TXT}")
    else:
        raise SystemExit(f"{args.input} not found (tinyshakespeare input.txt; give --input)")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != INPUT_SHA256:
        print(f"warning: {src} sha256 {digest} != expected {INPUT_SHA256}", file=sys.stderr)
    text = raw.decode("utf-8")
    train_text, test_text = split_text(text, args.holdout)
    assert train_text + test_text == text
    for path, part in ((TRAIN_TXT, train_text), (TEST_TXT, test_text)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(part.encode("utf-8"))
    print(f"split: {len(train_text)} train chars, {len(test_text)} test chars "
          f"({len(test_text) / len(text):.4f} of {len(text)})")

    tok = train_tokenizer(train_text, args.vocab_size)
    work = Path(args.work)
    tok_dir = work / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    hf = wrap_tokenizer(tok)
    hf.save_pretrained(tok_dir)
    n_vocab = tok.get_vocab_size()
    train_ids = np.asarray(tok.encode(train_text).ids, dtype=np.uint16)
    test_ids = np.asarray(tok.encode(test_text).ids, dtype=np.uint16)
    # the wrapped tokenizer must give the same ids (no BOS is added)
    assert hf(test_text[:2000])["input_ids"] == tok.encode(test_text[:2000]).ids
    np.save(work / "train_ids.npy", train_ids)
    np.save(work / "test_ids.npy", test_ids)
    meta = {
        "input": str(src), "input_sha256": digest, "holdout": args.holdout,
        "train_chars": len(train_text), "test_chars": len(test_text),
        "train_sha256": hashlib.sha256(train_text.encode()).hexdigest(),
        "test_sha256": hashlib.sha256(test_text.encode()).hexdigest(),
        "tokenizer_vocab": n_vocab, "train_tokens": int(train_ids.size),
        "test_tokens": int(test_ids.size),
        "tokenizer_json_sha256": sha256_file(tok_dir / "tokenizer.json"),
    }
    (work / "prepare.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


# ----------------------------------------------------------------------------------------- model
def make_config(args, vocab_size: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        attention_dropout=0.0,
    )
    dims = [cfg.hidden_size, cfg.intermediate_size, cfg.head_dim * cfg.num_attention_heads,
            cfg.head_dim * cfg.num_key_value_heads, cfg.vocab_size]
    bad = [d for d in dims if d % 64]
    if bad:
        raise SystemExit(f"Linear dims must be multiples of 64, got {bad}")
    if not cfg.num_key_value_heads < cfg.num_attention_heads:
        raise SystemExit("want grouped-query attention: kv_heads < heads")
    return cfg


@torch.no_grad()
def eval_ppl(model, ids: np.ndarray, device, seq_len: int = EVAL_SEQ_LEN, batch: int = 16,
             autocast_dtype=None) -> dict:
    """Token perplexity over non-overlapping windows of seq_len tokens (the last partial window
    is dropped), each window scored on its own: exp(mean NLL of the seq_len-1 predictions)."""
    model.eval()
    n = ids.size // seq_len
    x = torch.from_numpy(ids[: n * seq_len].astype(np.int64)).view(n, seq_len)
    nll, count = 0.0, 0
    for i in range(0, n, batch):
        xb = x[i:i + batch].to(device)
        logits = model(input_ids=xb).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                               xb[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += xb[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "windows": n, "tokens": count}


def unigram_ppl(train_ids: np.ndarray, test_ids: np.ndarray, vocab: int,
                seq_len: int = EVAL_SEQ_LEN) -> float:
    counts = np.bincount(train_ids.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    n = test_ids.size // seq_len
    tgt = test_ids[: n * seq_len].reshape(n, seq_len)[:, 1:].astype(np.int64)
    return float(math.exp(-logp[tgt].mean()))


def save_shards(state: dict, work: Path, n_shards: int = 2) -> list[str]:
    """fp32 state dict in shards (each < 16 MiB so it can travel back from a GPU machine)."""
    from safetensors.torch import save_file

    keys = list(state)
    total = sum(state[k].numel() for k in keys)
    names, shard, size, idx = [], {}, 0, 1
    for k in keys:
        shard[k] = state[k].contiguous()
        size += state[k].numel()
        if size >= total * idx / n_shards and idx < n_shards:
            names.append(f"best-{idx:05d}.safetensors")
            save_file(shard, str(work / names[-1]), metadata={"format": "pt"})
            shard, idx = {}, idx + 1
    if shard:
        names.append(f"best-{idx:05d}.safetensors")
        save_file(shard, str(work / names[-1]), metadata={"format": "pt"})
    return names


def load_shards(work: Path, names: list[str]) -> dict:
    from safetensors.torch import load_file

    state = {}
    for n in names:
        state.update(load_file(str(work / n)))
    return state


# ----------------------------------------------------------------------------------------- train
def cmd_train(args) -> None:
    from transformers import LlamaForCausalLM

    work = Path(args.work)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    prep = json.loads((work / "prepare.json").read_text())
    train_ids = np.load(work / "train_ids.npy")
    test_ids = np.load(work / "test_ids.npy")
    vocab = math.ceil(prep["tokenizer_vocab"] / 64) * 64
    cfg = make_config(args, vocab)
    cfg._attn_implementation = "eager"  # deterministic backward

    set_seed(args.seed)
    model = LlamaForCausalLM(cfg)  # initialised on the CPU: same weights on any device
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device {device}, params {n_params:,}, train tokens {train_ids.size:,}, "
          f"test tokens {test_ids.size:,}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to min_lr_ratio*lr at max_steps
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    data = torch.from_numpy(train_ids.astype(np.int64))
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_start = data.numel() - args.seq_len
    best = {"ppl": float("inf"), "step": -1}
    best_state, bad_evals, history = None, 0, []
    t0 = time.time()
    train_loss_ema = None
    step = 0
    for step in range(1, args.max_steps + 1):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1)
        starts = torch.randint(0, n_start + 1, (args.batch,), generator=gen)
        xb = torch.stack([data[s:s + args.seq_len] for s in starts.tolist()]).to(device)
        loss = model(input_ids=xb, labels=xb).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        li = loss.item()
        train_loss_ema = li if train_loss_ema is None else 0.9 * train_loss_ema + 0.1 * li
        if step % args.eval_every == 0 or step == args.max_steps:
            ev = eval_ppl(model, test_ids, device)
            rec = {"step": step, "lr": lr_at(step - 1), "train_loss_ema": train_loss_ema,
                   "val_ppl": ev["ppl"], "time_s": time.time() - t0}
            history.append(rec)
            improved = ev["ppl"] < best["ppl"]
            if improved:
                best = {"ppl": ev["ppl"], "nll": ev["nll"], "step": step,
                        "train_loss_ema": train_loss_ema}
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                bad_evals = 0
            else:
                bad_evals += 1
            print(f"step {step:5d} lr {rec['lr']:.2e} train_loss(ema) {train_loss_ema:.4f} "
                  f"val_ppl {ev['ppl']:.3f}{' *' if improved else ''} ({rec['time_s']:.0f}s)", flush=True)
            if bad_evals >= args.patience:
                print(f"early stop: no improvement for {args.patience} evaluations", flush=True)
                break
    last_step = step

    # train-split loss of the best checkpoint (same window scheme as the held-out ppl)
    model.load_state_dict(best_state)
    tr = eval_ppl(model, train_ids, device)
    state = {k: v for k, v in best_state.items() if k != "lm_head.weight"}  # tied to embed_tokens
    shards = save_shards(state, work)
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "params": n_params,
        "vocab_size": vocab,
        "best_step": best["step"],
        "last_step": last_step,
        "val_ppl_fp32": best["ppl"],
        "val_nll_fp32": best["nll"],
        "train_loss_ema_at_best": best["train_loss_ema"],
        "train_split_nll_at_best": tr["nll"],
        "train_split_ppl_at_best": tr["ppl"],
        "train_time_s": time.time() - t0,
        "shards": shards,
        "history": history,
    }
    (work / "train_result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"best step {best['step']} val_ppl {best['ppl']:.3f}; train-split ppl {tr['ppl']:.3f}; "
          f"saved {shards}", flush=True)


# ---------------------------------------------------------------------------------------- export
def cmd_export(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    work, out = Path(args.work), Path(args.out)
    prep = json.loads((work / "prepare.json").read_text())
    res = json.loads((work / "train_result.json").read_text())
    targs = argparse.Namespace(**res["args"])
    train_ids = np.load(work / "train_ids.npy")
    test_ids = np.load(work / "test_ids.npy")
    cpu = torch.device("cpu")

    cfg = make_config(targs, res["vocab_size"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    state = load_shards(work, res["shards"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    fp32 = eval_ppl(model, test_ids, cpu)
    print(f"fp32 weights (CPU): val ppl {fp32['ppl']:.4f} (training run said {res['val_ppl_fp32']:.4f})")

    if out.exists():
        shutil.rmtree(out)
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model.save_pretrained(out, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    tok.save_pretrained(out)
    make_compatible(out)

    # re-load what was written
    m32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    bf16_in_fp32 = eval_ppl(m32, test_ids, cpu)
    m16 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    bf16 = eval_ppl(m16, test_ids, cpu)
    uni = unigram_ppl(train_ids, test_ids, res["vocab_size"])
    tok = AutoTokenizer.from_pretrained(out)
    head = tok(TEST_TXT.read_text()[:5000])["input_ids"][:-1]  # the cut may split the last token
    assert head == test_ids[: len(head)].tolist(), "saved tokenizer disagrees with the training ids"
    prompt = "ROMEO:\n"
    enc = tok(prompt, return_tensors="pt")
    torch.manual_seed(0)
    gen = m32.generate(**enc, max_new_tokens=60, do_sample=False)
    sample = tok.decode(gen[0], skip_special_tokens=True)
    torch.manual_seed(0)
    gen = m32.generate(**tok("KING RICHARD III:\n", return_tensors="pt"), max_new_tokens=80,
                       do_sample=True, temperature=0.8, top_k=40)
    sampled = tok.decode(gen[0], skip_special_tokens=True)
    print(f"bf16 weights, fp32 compute: ppl {bf16_in_fp32['ppl']:.4f}; bf16 compute: {bf16['ppl']:.4f}; "
          f"unigram {uni:.2f}")
    print("greedy sample:\n" + sample)
    print("sampled:\n" + sampled)

    st = out / "model.safetensors"
    st.chmod(0o644)
    n_params = sum(p.numel() for p in m32.parameters())
    info = {
        "params": n_params, "safetensors_bytes": st.stat().st_size,
        "val_ppl_fp32": fp32["ppl"], "val_ppl_bf16_weights_fp32_compute": bf16_in_fp32["ppl"],
        "val_ppl_bf16": bf16["ppl"], "unigram_ppl": uni, "eval_windows": fp32["windows"],
        "eval_tokens": fp32["tokens"], "greedy_sample": sample, "sampled": sampled,
    }
    (work / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    write_readme(out, work, prep, res, info, targs)
    print(f"wrote {out} ({st.stat().st_size:,} bytes model.safetensors, {n_params:,} params)")


def make_compatible(out: Path) -> None:
    """Let transformers 4.x (e.g. TPU-MLIR's own environment) read the folder too: name the
    tokenizer class PreTrainedTokenizerFast, put the chat template in tokenizer_config.json,
    and repeat the dtype / RoPE theta under their 4.x keys in config.json."""
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["chat_template"] = CHAT_TEMPLATE
    for junk in ("is_local", "local_files_only"):
        tc.pop(junk, None)
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = "bfloat16"
    cfg.setdefault("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_readme(out: Path, work: Path, prep: dict, res: dict, info: dict, a) -> None:
    hist = res["history"]
    rows = [h for h in hist if h["step"] % (a.eval_every * 4) == 0 or h["step"] == res["best_step"]]
    hist_md = "\n".join(f"| {h['step']} | {h['lr']:.2e} | {h['train_loss_ema']:.4f} | {h['val_ppl']:.3f} |"
                        for h in rows)
    cfg = json.loads((out / "config.json").read_text())
    non_default = [f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(a).items())
                   if k in DEFAULTS and DEFAULTS[k] != v and k not in ("work", "out", "input", "device")]
    extra = (" " + " ".join(non_default)) if non_default else ""
    sweep_md = ""
    sweep_path = work / "sweep.json"  # written by the hyper-parameter sweep, if one was run
    if sweep_path.exists():
        sw = json.loads(sweep_path.read_text())
        lines = [f"| {r['args']['lr']} | {r['args']['max_steps']} | {r['args']['weight_decay']} | "
                 f"{r['best_step']} | {r['val_ppl_fp32']:.3f} |" for r in
                 sorted(sw["runs"].values(), key=lambda r: r["val_ppl_fp32"])]
        sweep_md = (
            "\nThe defaults of the script (lr, max-steps) were chosen by a sweep of 8 runs of the `train`\n"
            "stage (all other settings as above; the 8 ran at once on the one GPU, so the times above\n"
            "are not those of a lone run). Every run peaked after 225-300 steps (3.7-4.9M tokens,\n"
            "12-16 passes over the training tokens) and then overfit; the held-out text picked the run:\n\n"
            "| lr | max-steps | weight decay | best step | val ppl |\n| --- | --- | --- | --- | --- |\n"
            + "\n".join(lines) + "\n")
    text = f"""# shakespeare-llama: the embedded demo model

A small Llama-architecture causal LM (`LlamaForCausalLM`, `model_type: llama`) trained from
scratch on the tiny-shakespeare text, made by `tools/train_demo_model.py` so that the llmc_tpu
demo needs neither network nor training. It is a real, if tiny, test of quantization: every
Linear in/out dimension is a multiple of 64, attention is grouped-query (fewer kv heads than
heads) and the embeddings are tied.

## Shape

| | |
| --- | --- |
| layers | {cfg['num_hidden_layers']} |
| hidden size | {cfg['hidden_size']} |
| attention heads / kv heads / head_dim | {cfg['num_attention_heads']} / {cfg['num_key_value_heads']} / {cfg['head_dim']} (q_proj/o_proj {cfg['num_attention_heads'] * cfg['head_dim']}, k_proj/v_proj out {cfg['num_key_value_heads'] * cfg['head_dim']}) |
| MLP intermediate size | {cfg['intermediate_size']} (SiLU-gated) |
| vocabulary | {cfg['vocab_size']} (byte-level BPE, {prep['tokenizer_vocab']} used) |
| context trained / max_position_embeddings | {a.seq_len} / {cfg['max_position_embeddings']} (RoPE theta {cfg.get('rope_parameters', {}).get('rope_theta', cfg.get('rope_theta'))}) |
| tie_word_embeddings | {cfg['tie_word_embeddings']} |
| parameters | {info['params']:,} |
| weights | `model.safetensors`, bfloat16, {info['safetensors_bytes']:,} bytes |

Tokenizer: byte-level BPE (HF `tokenizers`, GPT-2 style pre-tokenizer, no unknown tokens) trained
on the training split only; saved as a `PreTrainedTokenizerFast` folder (`tokenizer.json`,
`tokenizer_config.json`, chat template). Special tokens `<unk>`=0, `<s>`=1 (bos), `</s>`=2
(eos), `<pad>`=3. The tokenizer adds **no** BOS token, and the model was trained on plain
token streams without one. The chat template renders each message as `ROLE:\\ncontent\\n\\n`
(the play-script format of the text) and ends with `ASSISTANT:\\n` for a generation prompt.

## Data

- Source: `tinyshakespeare/input.txt` (Shakespeare, public domain; the copy shipped in
  pytorch/examples, BSD-3-Clause, `distributed/minGPT-ddp/mingpt/data/input.txt`),
  {prep['train_chars'] + prep['test_chars']:,} characters, sha256 `{prep['input_sha256']}`.
- Split by characters: the first {1 - prep['holdout']:.0%} (cut moved forward to the next line
  start) is `data/LLM/cali/tinyshakespeare/train.txt` ({prep['train_chars']:,} chars,
  {prep['train_tokens']:,} tokens); the rest is `data/LLM/eval/tinyshakespeare/test.txt`
  ({prep['test_chars']:,} chars, {prep['test_tokens']:,} tokens). Tokenizer and model saw only
  the training split; the held-out split was used for early stopping / checkpoint selection and
  is the evaluation text.

## Training

Command (from the repository root; `train` uses CUDA when present: it ran on one
{res['device_name']} with torch {res['torch']}, transformers {res['transformers']}; `prepare` and
`export`, with all the evaluation below, ran on the CPU):

```
python tools/train_demo_model.py all{extra}
# which is the same as
python tools/train_demo_model.py prepare{extra}
python tools/train_demo_model.py train{extra}
python tools/train_demo_model.py export{extra}
```

| | |
| --- | --- |
| seed | {a.seed} (model init: `torch.manual_seed(seed)`; batch sampling: `torch.Generator().manual_seed(seed+1)`) |
| batch x sequence | {a.batch} x {a.seq_len} tokens (random windows of the training token stream) |
| optimizer | AdamW, betas (0.9, 0.95), weight decay {a.weight_decay} on matrices (not norms), grad-norm clip {a.grad_clip} |
| lr schedule | peak {a.lr}, linear warmup {a.warmup} steps, cosine decay to {a.min_lr_ratio} x peak at step {a.max_steps} |
| early stopping | held-out perplexity every {a.eval_every} steps, stop after {a.patience} evaluations without improvement, keep the best |
| steps run / best step | {res['last_step']} / {res['best_step']} ({res['train_time_s']:.0f} s) |
| dropout | 0 (Llama has none) |
| precision | fp32 training (TF32 off, deterministic algorithms, eager attention) |
| final train loss | {res['train_loss_ema_at_best']:.4f} (EMA of the batch loss at the best step); {res['train_split_nll_at_best']:.4f} over the training split in the evaluation windows (ppl {res['train_split_ppl_at_best']:.2f}) |

{sweep_md}
How the committed copy was made: `prepare` on a CPU machine; `.demo_model_work/` (the token
ids) was then copied to a GPU machine, where `python tools/train_demo_model.py train --device cuda`
ran with each sweep setting (the chosen one is the script's default); the best run's
`.demo_model_work/best-0000{{1,2}}.safetensors` (fp32, tied `lm_head` left out) and
`train_result.json` were copied back, and `export` ran on the CPU. Determinism: sweep runs that
share lr and warm-up gave identical held-out perplexities at every evaluation until their lr
schedules part, so a run repeats exactly on the same GPU with the same software; another
device or library version gives slightly different numbers. The held-out text served for
checkpoint and hyper-parameter selection as well as for the figures below, so they are
slightly optimistic.

Training curve (held-out perplexity):

| step | lr | train loss (EMA) | val ppl |
| --- | --- | --- | --- |
{hist_md}

## Held-out perplexity

Token perplexity on `test.txt`: the held-out text tokenized as a whole, cut into
{info['eval_windows']} non-overlapping windows of {EVAL_SEQ_LEN} tokens (last partial window dropped), each
window scored on its own, exp(mean NLL) over the {info['eval_tokens']:,} predicted tokens.

| model | ppl |
| --- | --- |
| best fp32 checkpoint (before export) | {info['val_ppl_fp32']:.3f} |
| this folder, bf16 weights, computed in fp32 (`from_pretrained(path, dtype=torch.float32)`) | {info['val_ppl_bf16_weights_fp32_compute']:.3f} |
| this folder, bf16 weights, computed in bf16 (`from_pretrained(path, dtype=torch.bfloat16)`) | {info['val_ppl_bf16']:.3f} |
| unigram baseline (training-split token frequencies, add-one) | {info['unigram_ppl']:.2f} |

Greedy continuation of `ROMEO:\\n` (60 new tokens, bf16 weights in fp32):

```
{info['greedy_sample']}
```

Sampled continuation of `KING RICHARD III:\\n` (80 new tokens, temperature 0.8, top-k 40,
`torch.manual_seed(0)`):

```
{info['sampled']}
```

## Licence / provenance

The text is public domain (Shakespeare); the tinyshakespeare file is from pytorch/examples
(BSD-3-Clause). The tokenizer and the weights are derived only from it by the script above and
are distributed under the project's licence.
"""
    (out / "README.md").write_text(text)


# ------------------------------------------------------------------------------------------ main
DEFAULTS = dict(
    input=str(DEFAULT_INPUT), work=str(DEFAULT_WORK), out=str(DEFAULT_OUT), holdout=0.1,
    vocab_size=4096, hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2,
    seed=1234, batch=32, seq_len=512, lr=2e-3, min_lr_ratio=0.1, warmup=100, max_steps=600,
    weight_decay=0.1, grad_clip=1.0, eval_every=25, patience=12, device=None,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Example"):],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("stage", choices=["prepare", "train", "export", "all"])
    d = DEFAULTS
    p.add_argument("--input", default=d["input"], help="tinyshakespeare input.txt (default %(default)s; "
                   "if missing, rebuilt from the committed train.txt + test.txt)")
    p.add_argument("--work", default=d["work"], help="scratch folder, git-ignored (default %(default)s)")
    p.add_argument("--out", default=d["out"], help="model folder to write (default %(default)s)")
    p.add_argument("--holdout", type=float, default=d["holdout"], help="held-out fraction (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=d["vocab_size"], help="BPE vocabulary (default %(default)s)")
    p.add_argument("--hidden", type=int, default=d["hidden"])
    p.add_argument("--intermediate", type=int, default=d["intermediate"])
    p.add_argument("--layers", type=int, default=d["layers"])
    p.add_argument("--heads", type=int, default=d["heads"])
    p.add_argument("--kv-heads", type=int, default=d["kv_heads"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--batch", type=int, default=d["batch"])
    p.add_argument("--seq-len", type=int, default=d["seq_len"], help="training context (default %(default)s)")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--min-lr-ratio", type=float, default=d["min_lr_ratio"])
    p.add_argument("--warmup", type=int, default=d["warmup"])
    p.add_argument("--max-steps", type=int, default=d["max_steps"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--grad-clip", type=float, default=d["grad_clip"])
    p.add_argument("--eval-every", type=int, default=d["eval_every"])
    p.add_argument("--patience", type=int, default=d["patience"])
    p.add_argument("--device", default=d["device"], help="cuda / cpu (default: cuda if available)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.stage in ("prepare", "all"):
        cmd_prepare(args)
    if args.stage in ("train", "all"):
        cmd_train(args)
    if args.stage in ("export", "all"):
        cmd_export(args)


if __name__ == "__main__":
    main()
