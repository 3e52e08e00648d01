"""Our text model against transformers' Kimi-K2.5 implementation on the tiny checkpoint."""

from pathlib import Path

import pytest
import torch
from hf_reference import hf_greedy, hf_logits, load_hf_model

from shared.checkpoint import NUM_BASE_TOKENS

PROMPT_LENGTHS = (5, 37, 113, 200)
MAX_LOGIT_DIFF = 1e-4
NUM_GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    # Plain (non-special) ids, so no prompt contains the media placeholder.
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, NUM_BASE_TOKENS, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def hf_loaded(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    return load_hf_model(tiny_checkpoint, tmp_path_factory.mktemp("hf_copy"))


@pytest.fixture(scope="module")
def hf_model(hf_loaded):
    return hf_loaded[0]


@pytest.fixture(scope="module")
def our_model(tiny_checkpoint: Path):
    from shared.model.loader import load_text_model

    return load_text_model(tiny_checkpoint, dtype=torch.float32)


def test_transformers_loads_every_tensor(hf_loaded):
    _, info = hf_loaded
    assert not info["missing_keys"], sorted(info["missing_keys"])
    assert not info["unexpected_keys"], sorted(info["unexpected_keys"])
    assert not info["mismatched_keys"], info["mismatched_keys"]


def test_transformers_reference_is_sane(hf_model, prompts):
    logits = hf_logits(hf_model, prompts[1])
    assert logits.shape == (len(prompts[1]), 2048)
    assert bool(logits.isfinite().all())
    # O(1) logits that still pick different tokens at different positions.
    assert 0.1 < float(logits.std()) < 10.0
    assert len(set(logits.argmax(-1).tolist())) > len(prompts[1]) // 2


def test_logits_match_transformers(our_model, hf_model, prompts):
    from shared.model.generate import reference_logits

    for prompt in prompts:
        ours = reference_logits(our_model, prompt)
        ref = hf_logits(hf_model, prompt)
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        diff = float((ours - ref).abs().max())
        assert diff <= MAX_LOGIT_DIFF, f"prompt of {len(prompt)} tokens: max |diff| {diff:.3g}"


@pytest.mark.parametrize("prompt_index", [0, 3])
def test_greedy_matches_transformers(our_model, hf_model, prompts, prompt_index):
    from shared.model.generate import greedy_generate

    prompt = prompts[prompt_index]
    expected = hf_greedy(hf_model, prompt, NUM_GREEDY_TOKENS)
    assert greedy_generate(our_model, prompt, NUM_GREEDY_TOKENS) == expected
