"""Shared pytest fixtures."""

from pathlib import Path

import openai
import pytest
from stack_utils import start_stack


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Kimi-K2.5 checkpoint (seed 0), generated once per test session."""
    from shared.checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the tiny tokenizer files (`write_tokenizer_files`), once per session."""
    from shared.tokenizer_train import write_tokenizer_files

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tokenizer_files(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    """`KimiTokenizer` over the tiny tokenizer files."""
    from shared.tokenizer import KimiTokenizer

    return KimiTokenizer.from_dir(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path):
    """The default stack (one worker per pool), one per test module; a module that needs other
    settings defines its own `stack`."""
    stack = start_stack(tiny_checkpoint)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    """The openai client of the module's stack."""
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0, timeout=120)
