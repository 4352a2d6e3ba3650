"""Config validation: every error names the key path, the value and what is allowed."""

import textwrap

import pytest
import yaml

from llmc_tpu.config import ConfigError, load_config, parse_config
from llmc_tpu.config.load import tpu_format

MINIMAL = {"model": {"path": "m"}, "quant": {"method": "RTN"}, "save": {"save_path": "s"}}

# The llmc-tpu templates, key for key (tpu/config/LLM/Awq.yml, tpu/LLM/GPTQ.yml, tpu/config/VLM/Awq.yml).
SEED_AWQ = """
base:
    seed: &seed 42
model:
    type: Qwen2
    path: model path
    tokenizer_mode: slow
    torch_dtype: auto
calib:
    name: pileval
    download: False
    path: calib data path
    n_samples: 128
    bs: -1
    seq_len: 512
    preproc: pileval_awq
    seed: *seed
eval:
    eval_pos: [pretrain, fake_quant]
    name: wikitext2
    download: False
    path: eval data path
    seq_len: 2048
    bs: 1
    inference_per_block: False
    eval_token_consist: True
quant:
    method: Awq
    weight:
        bit: 4
        symmetric: False
        granularity: per_group
        group_size: 64
    special:
        trans: True
        trans_version: v2
        weight_clip: True
        clip_sym: True
save:
    save_trans: True
    save_fake: False
    save_path: ./save_awq_w4a16
"""
SEED_GPTQ = """
base:
    seed: &seed 0
model:
    type: Llama
    path: model path
    torch_dtype: auto
calib:
    name: wikitext2
    download: False
    n_samples: 128
    path: calib data path
    bs: 1
    seq_len: 2048
    preproc: wikitext2_gptq
    seed: *seed
eval:
    eval_pos: [fake_quant]
    name: wikitext2
    download: False
    path: eval data path
    bs: 1
    seq_len: 2048
    inference_per_block: False
quant:
    method: GPTQ
    weight:
        bit: 4
        symmetric: False
        granularity: per_group
        group_size: 64
    special:
        actorder: False
        static_groups: False
        percdamp: 0.01
        blocksize: 128
        true_sequential: True
    quant_out: True
save:
    save_fake: False
    save_path: ./save_gptq_w4a16
"""
SEED_VLM = """
base:
    seed: &seed 42
model:
    type: Qwen2VL
    path: /workspace/Qwen2-VL-2B-Instruct
    torch_dtype: auto
calib:
    name: custom_mm
    download: False
    path: data/VLM/cali/general_custom_data
    n_samples: 8
    bs: -1
    seq_len: 512
    padding: True
    apply_chat_template: True
    add_answer: True
    seed: *seed
eval:
    eval_pos: [pretrain, fake_quant]
    name: wikitext2
    path: x
    bs: 1
    seq_len: 2048
quant:
    method: Awq
    quant_objects: [language]
    weight:
        bit: 8
        symmetric: True
        granularity: per_channel
        group_size: -1
    special:
        trans: True
        trans_version: v2
        weight_clip: True
        clip_sym: True
save:
    save_trans: True
    save_path: ./save_path
run:
    task_name: awq_w_only
    task_type: VLM
"""


def problems_of(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("text", [SEED_AWQ, SEED_GPTQ, SEED_VLM])
def test_seed_templates_pass(text):
    cfg = parse_config(yaml.safe_load(text))
    assert cfg.quant.method in ("Awq", "GPTQ")


def test_minimal_config_fills_every_default():
    cfg = parse_config(MINIMAL)
    assert cfg.run.chip == "bm1684x" and cfg.quant.weight.bit == 4 and cfg.quant.weight.group_size == 64
    assert cfg.eval.eval_pos == ["pretrain", "transformed", "fake_quant"]
    assert cfg.calib.seed == cfg.base.seed == 42
    dumped = cfg.model_dump()
    assert set(dumped) == {"base", "model", "calib", "eval", "quant", "save", "run"}
    assert dumped["save"]["save_trans"] is True


def test_method_any_case_and_method_defaults():
    assert parse_config({**MINIMAL, "quant": {"method": "gptq"}}).calib.name == "wikitext2"
    cfg = parse_config({**MINIMAL, "quant": {"method": "AWQ"}})
    assert cfg.quant.method == "Awq" and cfg.calib.preproc == "pileval_awq"
    assert {k: cfg.quant.special[k] for k in ("trans", "trans_version", "weight_clip", "clip_sym", "gqa_o_proj")} == {
        "trans": True, "trans_version": "v2", "weight_clip": True, "clip_sym": True, "gqa_o_proj": "skip"}


def test_unknown_keys_get_did_you_mean_with_path():
    probs = problems_of({**MINIMAL, "model": {"path": "m", "tpye": "llama"}, "evl": {}})
    assert any(p.startswith("model.tpye: unknown key (did you mean 'type'?)") for p in probs)
    assert any(p.startswith("evl: unknown key (did you mean 'eval'?)") for p in probs)


def test_every_problem_is_listed_at_once():
    probs = problems_of({"model": {}, "quant": {"method": "Awq", "weight": {"bit": 3, "granularity": "per_row"}}})
    assert any(p.startswith("model.path: required key is missing") for p in probs)
    assert any(p.startswith("save: required key is missing") for p in probs)
    assert any(p.startswith("quant.weight.bit = 3:") and "4 or 8" in p for p in probs)
    assert any(p.startswith("quant.weight.granularity = 'per_row':") and "per_channel" in p for p in probs)


def test_unknown_method_names_allowed_values():
    (p,) = problems_of({**MINIMAL, "quant": {"method": "GPTQQ"}})
    assert p.startswith("quant.method = 'GPTQQ': unknown method; allowed: RTN, Awq, GPTQ, SignRound, or a combination: [Awq, GPTQ], [Awq, SignRound] (did you mean 'GPTQ'?)")


def test_special_is_checked_per_method():
    (p,) = problems_of({**MINIMAL, "quant": {"method": "GPTQ", "special": {"percdamp": -1}}})
    assert p.startswith("quant.special.percdamp = -1:")
    (p,) = problems_of({**MINIMAL, "quant": {"method": "Awq", "special": {"actorder": True}}})
    assert "not an option of Awq" in p and "allowed: trans, trans_version, weight_clip, clip_sym" in p


@pytest.mark.parametrize("weight,key,needle", [
    ({"bit": 4, "granularity": "per_channel", "symmetric": True}, "quant.weight.symmetric", "asymmetric only"),
    ({"bit": 8, "granularity": "per_channel", "symmetric": False}, "quant.weight.symmetric", "symmetric only"),
    ({"bit": 4, "granularity": "per_group", "group_size": -1}, "quant.weight.group_size", "positive group size"),
    ({"bit": 8, "granularity": "per_channel", "symmetric": True, "group_size": 64}, "quant.weight.group_size", "-1"),
])
def test_only_formats_tpu_mlir_produces(weight, key, needle):
    (p,) = problems_of({**MINIMAL, "quant": {"method": "RTN", "weight": weight}})
    assert p.startswith(key) and needle in p


@pytest.mark.parametrize("weight,expected", [
    ({"bit": 4, "symmetric": False, "group_size": 64}, (4, 64, False)),
    ({"bit": 4, "symmetric": True, "group_size": 64}, (4, 64, True)),
    ({"bit": 4, "group_size": 128}, (4, 128, False)),
    ({"bit": 8, "symmetric": True, "group_size": 64}, (8, 64, True)),
    ({"bit": 8, "symmetric": False, "group_size": 64}, (8, 64, False)),
    ({"bit": 8, "symmetric": True, "granularity": "per_channel"}, (8, 0, True)),
    ({"bit": 4, "symmetric": False, "granularity": "per_channel", "group_size": -1}, (4, 0, False)),
])
def test_tpu_mlir_formats_accepted(weight, expected):
    cfg = parse_config({**MINIMAL, "quant": {"method": "RTN", "weight": weight}, "run": {"chip": "bm1688", "tpu_dtype": "f16"}})
    fmt = tpu_format(cfg)
    assert (fmt.bits, fmt.group_size, fmt.symmetric) == expected
    assert fmt.chip == "bm1688" and fmt.scale_dtype == "float16" and fmt.llm_convert_quantize == f"w{expected[0]}f16"


def test_bad_chip_and_unsupported_export():
    probs = problems_of({**MINIMAL, "run": {"chip": "bm1686"}})
    assert any(p.startswith("run.chip = 'bm1686':") and "bm1684x" in p for p in probs)
    (p,) = problems_of({**MINIMAL, "save": {"save_path": "s", "save_lightllm": True}})
    assert p.startswith("save.save_lightllm = True:") and "save_vllm" in p


def test_yaml_errors_name_the_line(tmp_path):
    f = tmp_path / "bad.yml"
    f.write_text(textwrap.dedent("""
        model:
          path: m
         quant: [
    """))
    with pytest.raises(ConfigError, match=r"line \d+, column \d+"):
        load_config(f)
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.yml")
    (tmp_path / "list.yml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(tmp_path / "list.yml")


def test_calib_bs_must_be_minus_one_or_positive():
    (p,) = problems_of({**MINIMAL, "calib": {"bs": 0}})
    assert p.startswith("calib.bs = 0:")
