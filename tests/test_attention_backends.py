"""Choosing the attention backend, and FlashInfer's backend against the PyTorch one on a GPU.

The CPU tests check that no CPU path imports `flashinfer` (it imports on a CPU machine, but
every kernel fails there) and the page metadata FlashInfer's plan reads. The `gpu` tests need
CUDA and `flashinfer-python` (`pip install -e ".[gpu]"`) and are skipped without them;
`bench/gpu_check.sh` runs them.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench.gpu_check import KIMI_DIMS, TINY_DIMS, Case, random_case, reference
from shared.attention import ForwardBatch, TorchAttentionBackend, make_attention_backend
from shared.attention_flashinfer import plan_metadata
from shared.settings import parse_worker_config

ROOT = Path(__file__).parent.parent


def test_auto_selection_never_imports_flashinfer_on_cpu(tmp_path):
    """An empty `flashinfer` package sits first on the path (so the check holds where the real
    one is not installed); every CPU choice of the runner and the backend factory must leave it
    out of `sys.modules` (an import of `flashinfer.mla` would put it there, even failing)."""
    (tmp_path / "flashinfer").mkdir()
    (tmp_path / "flashinfer" / "__init__.py").write_text("")
    script = textwrap.dedent("""
        import sys
        import torch
        from bench.gpu_check import TINY_DIMS, Case, random_case
        from shared.attention import TorchAttentionBackend, make_attention_backend
        from shared.checkpoint import make_tiny_checkpoint
        from shared.model.loader import load_text_model
        from shared.runner import ModelRunner

        cache, *_ = random_case(Case("decode", 2, 1, 40), TINY_DIMS, 16, torch.bfloat16, "cpu")
        for choice in ("auto", "torch"):
            backend = make_attention_backend(cache, 0.3, "cpu", choice)
            assert type(backend) is TorchAttentionBackend, backend
        try:
            make_attention_backend(cache, 0.3, "cpu", "flashinfer")
            raise AssertionError("flashinfer on a CPU cache was accepted")
        except ValueError as exc:
            assert "device cpu" in str(exc), exc
        model = load_text_model(make_tiny_checkpoint(sys.argv[1]), dtype=torch.bfloat16)
        runner = ModelRunner(model, 8, 16)
        assert type(runner.backend) is TorchAttentionBackend, runner.backend
        assert "flashinfer" not in sys.modules, "flashinfer was imported"
        print("OK")
    """)
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpt")], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.stdout.strip() == "OK", result.stderr[-2000:]


def test_unknown_backend_is_refused():
    cache, *_ = random_case(Case("decode", 1, 1, 8), TINY_DIMS, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="choose one of"):
        make_attention_backend(cache, 0.3, "cpu", "triton")


def test_worker_flags_carry_device_and_backend():
    config = parse_worker_config(
        ["--model-path", "m", "--worker-id", "w", "--device", "cuda:1",
         "--attention-backend", "torch", "--dtype", "bfloat16"], "test")  # fmt: skip
    assert (config.device, config.attention_backend, config.dtype) == ("cuda:1", "torch",
                                                                       "bfloat16")  # fmt: skip
    defaults = parse_worker_config(["--model-path", "m", "--worker-id", "w"], "test")
    assert (defaults.device, defaults.attention_backend) == ("cpu", "auto")


def test_plan_metadata_is_csr_of_the_used_pages():
    batch = ForwardBatch(
        input_ids=torch.zeros(6, dtype=torch.long),
        positions=torch.zeros(6, dtype=torch.long),
        slots=torch.zeros(6, dtype=torch.long),
        q_lens=[1, 4, 1],
        kv_lens=[17, 4, 32],
        # the second table holds a page reserved ahead that its 4 tokens do not reach yet
        page_tables=[[9, 3], [5, 7], [0, 2]],
    )
    qo_indptr, kv_indptr, kv_indices, kv_lens = plan_metadata(batch, page_size=16)
    assert qo_indptr.tolist() == [0, 1, 5, 6]
    assert kv_indptr.tolist() == [0, 2, 3, 5]
    assert kv_indices.tolist() == [9, 3, 5, 0, 2]
    assert kv_lens.tolist() == [17, 4, 32]
    assert {t.dtype for t in (qo_indptr, kv_indptr, kv_indices, kv_lens)} == {torch.int32}


@pytest.mark.parametrize("case", [Case("decode", 5, 1, 70), Case("prefill", 3, 9, 50)])
def test_check_shapes_torch_backend_equals_reference(case):
    """The GPU check's random ragged batches on shuffled pages, on the CPU oracle."""
    cache, batch, q_lat, q_pe = random_case(case, TINY_DIMS, 16, torch.float32, "cpu", seed=3)
    assert len({p for table in batch.page_tables for p in table}) == sum(
        len(t) for t in batch.page_tables
    )
    assert len(set(batch.kv_lens)) == case.batch  # ragged: every length differs
    out = TorchAttentionBackend(cache, TINY_DIMS.scale).forward(0, q_lat, q_pe, batch)
    ref = reference(cache, batch, q_lat, q_pe, TINY_DIMS.scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


class _DocumentedMLAWrapper:
    """A CPU stand-in for `flashinfer.mla.BatchMLAPagedAttentionWrapper` (no GPU here), written
    from FlashInfer's documented contract: keyword names of `plan` and `run`, CSR page metadata
    (`kv_indptr` over pages, `kv_len_arr` in tokens), `sm_scale` over the whole logit, causal
    queries at the end of their keys. It checks what our backend hands the real kernel."""

    def plan(self, *, qo_indptr, kv_indptr, kv_indices, kv_len_arr, num_heads, head_dim_ckv,
             head_dim_kpe, page_size, causal, sm_scale, q_data_type, kv_data_type) -> None:  # fmt: skip
        for t in (qo_indptr, kv_indptr, kv_indices, kv_len_arr):
            assert t.dtype == torch.int32 and t.device.type == "cpu"
        self.args = dict(locals())

    def run(self, *, q_nope, q_pe, ckv_cache, kpe_cache) -> torch.Tensor:
        a = self.args
        assert q_nope.dtype == a["q_data_type"] and ckv_cache.dtype == a["kv_data_type"]
        assert q_nope.shape[1:] == (a["num_heads"], a["head_dim_ckv"])
        assert ckv_cache.shape[1:] == (a["page_size"], a["head_dim_ckv"])
        assert kpe_cache.shape[1:] == (a["page_size"], a["head_dim_kpe"])
        qo, kv, idx, lens = (a[k].tolist() for k in ("qo_indptr", "kv_indptr", "kv_indices",
                                                     "kv_len_arr"))  # fmt: skip
        out = torch.empty_like(q_nope)
        for i, kv_len in enumerate(lens):
            pages = torch.tensor(idx[kv[i] : kv[i + 1]])
            ckv = ckv_cache[pages].flatten(0, 1)[:kv_len].float()
            kpe = kpe_cache[pages].flatten(0, 1)[:kv_len].float()
            q, r = q_nope[qo[i] : qo[i + 1]].float(), q_pe[qo[i] : qo[i + 1]].float()
            scores = torch.einsum("thd,sd->hts", q, ckv) + torch.einsum("thd,sd->hts", r, kpe)
            n = q.shape[0]
            mask = torch.ones(n, kv_len, dtype=torch.bool).tril(kv_len - n)
            if not a["causal"]:
                assert n == 1
            scores = (scores * a["sm_scale"]).masked_fill(~mask, float("-inf"))
            out[qo[i] : qo[i + 1]] = torch.einsum("hts,sd->thd", scores.softmax(-1), ckv).to(out)
        return out


@pytest.mark.parametrize("case", [Case("decode", 6, 1, 90), Case("prefill", 4, 11, 60)])
def test_flashinfer_backend_hands_the_documented_contract(case):
    """Our FlashInfer backend (metadata, plan once, run per layer) around the CPU stand-in
    equals the PyTorch backend, on ragged batches over shuffled pages with pages reserved ahead."""
    from shared.attention_flashinfer import FlashInferAttentionBackend

    cache, batch, q_lat, q_pe = random_case(case, TINY_DIMS, 16, torch.float32, "cpu", seed=5)
    batch.page_tables[0].append(cache.num_pages - 1)  # a page reserved ahead, not yet written
    backend = object.__new__(FlashInferAttentionBackend)  # its __init__ imports flashinfer
    backend.cache, backend.scale, backend._planned, backend.num_plans = cache, 0.3, None, 0
    backend.wrapper = _DocumentedMLAWrapper()
    oracle = TorchAttentionBackend(cache, 0.3)
    for _ in range(2):  # two "layers" of one forward
        out = backend.forward(0, q_lat, q_pe, batch)
        torch.testing.assert_close(out, oracle.forward(0, q_lat, q_pe, batch))
    assert backend.num_plans == 1


def _has_flashinfer() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flashinfer") is not None


needs_flashinfer = pytest.mark.skipif(not _has_flashinfer(), reason="needs CUDA and flashinfer")

GPU_CASES = [
    Case("decode", 1, 1, 1),
    Case("decode", 7, 1, 300),
    Case("decode", 33, 1, 2049),
    Case("prefill", 1, 128, 128),
    Case("prefill", 3, 37, 500),  # chunked: queries are the last 37 of up to 500 keys
    Case("prefill", 2, 300, 300),
]


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c.kind}-b{c.batch}-q{c.q_len}")
@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_equals_torch_on_random_pages(case, page_size):
    from shared.attention_flashinfer import FlashInferAttentionBackend

    cache, batch, q_lat, q_pe = random_case(case, KIMI_DIMS, page_size, torch.bfloat16, "cuda")
    fast = make_attention_backend(cache, KIMI_DIMS.scale, "cuda")
    assert isinstance(fast, FlashInferAttentionBackend)
    out = fast.forward(0, q_lat, q_pe, batch)
    assert out.shape == q_lat.shape and out.dtype == torch.bfloat16
    ref = reference(cache, batch, q_lat, q_pe, KIMI_DIMS.scale)
    oracle = TorchAttentionBackend(cache, KIMI_DIMS.scale).forward(0, q_lat, q_pe, batch)
    # Outputs are averages of N(0, 1) latents; bf16 keeps about 3 significant digits.
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), oracle.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_flashinfer
def test_flashinfer_plans_once_per_forward():
    from shared.config import ModelConfig
    from shared.model.text import KimiTextModel
    from shared.runner import ModelRunner, SeqStep

    torch.manual_seed(0)
    model = KimiTextModel(ModelConfig.from_dict(_small_kimi_config()).text)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):  # the MoE router starts uninitialized (empty)
                param.normal_(std=0.02)
    model = model.to("cuda", torch.bfloat16).eval()
    fast = ModelRunner(model, 64, 16, "cuda", "flashinfer")
    oracle = ModelRunner(model, 64, 16, "cuda", "torch")
    prompts = [list(range(5, 5 + n)) for n in (40, 17, 3)]
    plans_before = fast.backend.num_plans  # the warm-up's
    logits = {}
    for name, runner in (("fast", fast), ("oracle", oracle)):
        steps = []
        for prompt in prompts:
            pages: list[int] = []
            runner.ensure_pages(pages, len(prompt) + 1)
            steps.append(SeqStep(prompt, 0, pages))
        prefill = runner.run(steps)
        decode = runner.run([SeqStep([7], len(p), s.page_table) for p, s in zip(prompts, steps)])
        logits[name] = (prefill, decode)
    assert fast.backend.num_plans - plans_before == 2  # one per forward, not one per layer
    for got, want in zip(logits["fast"], logits["oracle"]):
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() < 0.05 * scale, (got - want).abs().max()


def _small_kimi_config() -> dict:
    """Kimi-K2.5's attention dims (64 heads, latent 512 + rope 64) in a two-layer model."""
    from shared.checkpoint import TEXT_CONFIG

    return {**TEXT_CONFIG, "hidden_size": 1024, "intermediate_size": 1024,
            "moe_intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 64,
            "num_key_value_heads": 64, "q_lora_rank": 256, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "n_routed_experts": 8, "num_experts_per_tok": 2}  # fmt: skip
