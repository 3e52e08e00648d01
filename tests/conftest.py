"""Shared pytest fixtures."""

from pathlib import Path

import pytest


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
