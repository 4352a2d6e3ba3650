import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import TEXT, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def eval_txt(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("eval") / "eval.txt"
    p.write_text(TEXT.replace(". ", ".\n"), encoding="utf-8")
    return p
