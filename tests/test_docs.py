"""The README says what the code does: its commands, its config keys."""

import re
from pathlib import Path

from llmc_tpu.config.schema import SPECIALS, RunConfig

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    test_command = ci_lines[-1]
    assert test_command in README
    first_screen = README[:2500]
    assert test_command in first_screen and "configs/LLM/demo_rtn.yml" in first_screen


def test_every_config_key_is_documented_and_every_documented_key_exists():
    documented = set()
    config_section = README.split("## Config", 1)[1].split("\n## ", 1)[0]
    for key_cell in re.findall(r"^\| ((?:`[a-z_.]+`(?:, )?)+) \|", config_section, flags=re.M):
        documented |= set(re.findall(r"`([a-z_]+\.[a-z_.]+)`", key_cell))
    real = set()
    for section, field in RunConfig.model_fields.items():
        sub = field.annotation
        for key, f in sub.model_fields.items():
            if hasattr(f.annotation, "model_fields"):
                real |= {f"{section}.{key}.{k}" for k in f.annotation.model_fields}
            else:
                real.add(f"{section}.{key}")
    undocumented_ok = {"save.save_lightllm", "save.save_mlcllm", "save.save_trtllm", "quant.weight.calib_algo", "quant.quant_objects", "calib.download",
                       "calib.seed", "calib.padding", "calib.apply_chat_template", "calib.add_answer", "eval.download",
                       "eval.type", "run.task_name", "run.task_type"}
    assert documented <= real, documented - real
    assert real - undocumented_ok <= documented, (real - undocumented_ok) - documented
    for option in SPECIALS["Awq"].model_fields:
        assert option in README


def test_configs_in_the_repo_are_valid():
    from llmc_tpu.config import load_config

    for cfg in sorted((REPO / "configs").rglob("*.yml")):
        load_config(cfg)


def test_ruff_is_clean():
    """The repo's ruff configuration passes on the package, tests and tools (skipped where ruff is absent)."""
    import importlib.util
    import subprocess
    import sys

    import pytest

    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff not installed (pip install -e '.[dev]')")
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "llmc_tpu", "tests", "tools", "tpu"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
