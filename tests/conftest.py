"""Shared fixtures: tiny transformers models of each family, saved as transformers saves them.

Dimensions follow what bitsandbytes' CPU 4-bit matmul needs on an AVX512-BF16 CPU: it repacks the
weights and requires ``out_features % 32 == 0`` and ``in_features % 64 == 0`` (blocksize), so every
linear layer here is a multiple of 64 on both sides; otherwise transformers' own 4-bit model (the
reference) crashes in its forward pass.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

# Small enough that a family loads and runs in well under a second on 2 cores, big enough that every
# 4-bit weight has a few hundred blocks and every double-quantized one more than one 256-block group.
HIDDEN = 128
INTERMEDIATE = 384
VOCAB = 1024  # a multiple of 32 too: a skip list without lm_head quantizes the output layer
HEADS = 4
LAYERS = 2
POSITIONS = 128

#: Families ``tiny_model`` builds: name -> (transformers config class, model class) names.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "opt": ("OPTConfig", "OPTForCausalLM"),
    "bloom": ("BloomConfig", "BloomForCausalLM"),
    "bert": ("BertConfig", "BertModel"),
    "t5": ("T5Config", "T5ForConditionalGeneration"),
}


#: Variables of the caller's environment that would change what the tests exercise, without a word:
#: FASTQ_NUM_THREADS makes every run with the default thread count single-threaded (or oversubscribed),
#: so the multi-threaded paths the "default threads" tests compare against go untested; PYTHONWARNINGS
#: turns the subprocesses' warnings into errors or hides them (this process's filters come from
#: pyproject.toml, not from it).
CALLER_VARIABLES = ("FASTQ_NUM_THREADS", "PYTHONWARNINGS")


@pytest.fixture(autouse=True, scope="session")
def independent_of_the_caller():
    """The suite runs with none of ``CALLER_VARIABLES`` set, in this process (the Rust core reads
    FASTQ_NUM_THREADS at each call) and in the processes the tests start."""
    with pytest.MonkeyPatch.context() as mp:
        for name in CALLER_VARIABLES:
            mp.delenv(name, raising=False)
        yield


def auto_class(family: str):
    """The transformers auto class that loads a saved ``family`` model."""
    import transformers

    name = {"bert": "AutoModel", "t5": "AutoModelForSeq2SeqLM"}.get(family, "AutoModelForCausalLM")
    return getattr(transformers, name)


def tiny_config(family: str):
    """The transformers config of a tiny ``family`` model (see ``FAMILIES``)."""
    import transformers

    cfg_cls = getattr(transformers, FAMILIES[family][0])
    if family == "llama":
        return cfg_cls(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=POSITIONS,
            tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    if family == "gpt2":  # Conv1D layers, tied lm_head
        return cfg_cls(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS,
            n_inner=INTERMEDIATE, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    if family == "opt":
        return cfg_cls(
            vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    if family == "bloom":  # query_key_value: 3 * HIDDEN outputs, dense_h_to_4h: 4 * HIDDEN
        return cfg_cls(
            vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    if family == "bert":
        return cfg_cls(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=POSITIONS, pad_token_id=0,
        )
    if family == "t5":  # encoder-decoder; T5 keeps its "wo" layers in float32 (_keep_in_fp32_modules)
        return cfg_cls(
            vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=INTERMEDIATE, num_layers=LAYERS,
            num_decoder_layers=LAYERS, num_heads=HEADS, decoder_start_token_id=0, pad_token_id=0,
            eos_token_id=1,
        )
    raise KeyError(f"unknown family {family!r}; one of {sorted(FAMILIES)}")


#: Double quant against transformers on the CPU: fastq's offset is the GPU's (torch's CUDA float32 sum of
#: the absmax, in its order: test_quantize_bnb.py), transformers' there is torch's CPU sum, a few float32
#: ulps away (2 at most on the tiny models here); each nested absmax (the largest |absmax - offset| of
#: 256 values) moves with it.
OFFSET_ULPS = 3


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` on the CPU, as a flat uint8 tensor (equality is then bitwise: -0.0, NaN)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def float32_ulps(a, b) -> int:
    """The largest distance between ``a`` and ``b`` (float32 tensors or numbers, of one sign), in ulps."""
    x, y = (torch.as_tensor(v, dtype=torch.float32).reshape(-1).view(torch.int32).long() for v in (a, b))
    assert x.shape == y.shape
    return int((x - y).abs().max()) if x.numel() else 0


def nested_stat_close(key: str, ref: torch.Tensor, got: torch.Tensor) -> bool:
    """For a double-quant statistic of transformers' CPU state dict (``ref``) and fastq's (``got``):
    asserts they agree as the offsets allow and returns True; False for any other tensor. The nested
    absmax within ``OFFSET_ULPS``; the quant_state JSON equal but for ``nested_offset``, within
    ``OFFSET_ULPS``. (The nested codes, one step apart on a few entries, are the callers'.)"""
    import json

    if key.endswith(".nested_absmax"):
        assert ref.dtype == got.dtype == torch.float32 and ref.shape == got.shape, key
        assert float32_ulps(ref, got) <= OFFSET_ULPS, f"{key}: {float32_ulps(ref, got)} ulps apart"
        return True
    if ".quant_state.bitsandbytes__" in key:
        qa, qb = (json.loads(bytes(tensor_bytes(t).tolist())) for t in (ref, got))
        oa, ob = qa.pop("nested_offset", None), qb.pop("nested_offset", None)
        assert qa == qb and (oa is None) == (ob is None), key
        if oa is not None:
            assert float32_ulps(oa, ob) <= OFFSET_ULPS, f"{key}: nested_offset {oa} vs {ob}"
        return True
    return False


#: The map of mantissas where the GPU's reciprocal is not the correctly rounded one (benches/gpu/rcp_table.py
#: measured it; rust/core/quant/reciprocal.rs includes it).
RCP_TABLE = os.path.join(os.path.dirname(__file__), "..", "rust", "core", "quant", "rcp_gpu.bin")


@functools.cache
def _rcp_table() -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.fromfile(RCP_TABLE, dtype=np.uint8)).long()


def gpu_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """``rcp.approx.ftz.f32`` of a float32 tensor as bitsandbytes' CUDA kernels take it, from the measured
    map: where ``x`` and ``1 / x`` are normal and the map's bit for ``x``'s mantissa is set, the other
    float32 neighbour of the true 1/x; a reciprocal below 2^-126 flushed to a zero of its sign (as the
    GPU does); elsewhere the correctly rounded reciprocal (as fastq keeps it for subnormal ``x``)."""
    x = x.float()
    table = _rcp_table()
    r = torch.tensor(1.0) / x
    tiny = torch.finfo(torch.float32).tiny
    r = torch.where((r != 0) & (r.abs() < tiny), torch.copysign(torch.zeros_like(r), r), r)
    normal = torch.isfinite(x) & (x.abs() >= tiny) & torch.isfinite(r) & (r.abs() >= tiny)
    m = x.view(torch.int32).long() & ((1 << 23) - 1)
    other = normal & ((table[m >> 3] >> (m & 7)) & 1).bool()
    below = r.double().abs() < (1.0 / x.double()).abs()
    step = torch.where(below, 1, -1).to(torch.int32)
    return torch.where(other, (r.view(torch.int32) + step).view(torch.float32), r)


def reciprocal_differs(x: torch.Tensor) -> torch.Tensor:
    """Where the GPU's reciprocal of ``x`` is not the correctly rounded one (a boolean mask)."""
    return gpu_reciprocal(x) != torch.tensor(1.0) / x.float()


def int8_rows_as_on_the_gpu(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU CB of float16 ``x`` with the rows whose SCB's reciprocal the GPU rounds the other
    way requantized as its CUDA kernel does: ``round_half_even(x * (gpu_reciprocal(SCB) * 127))``."""
    rows = reciprocal_differs(scb) & (scb != 0)
    if not bool(rows.any()):
        return cb
    cb = cb.clone()
    scale = gpu_reciprocal(scb[rows]) * torch.tensor(127.0)
    cb[rows] = torch.round(x[rows].float() * scale.reshape(-1, 1)).to(torch.int8)
    return cb


def int8_quant_as_on_the_gpu(cpu):
    """``bitsandbytes.functional.int8_vectorwise_quant`` (``cpu``) with the weights' CB (threshold 0) as its
    CUDA kernel rounds them (``int8_rows_as_on_the_gpu``)."""

    def quant(A, threshold=0.0):
        cb, scb, cols = cpu(A, threshold)
        if threshold == 0.0 and A.dim() == 2 and A.device.type == "cpu":
            cb = int8_rows_as_on_the_gpu(A, cb, scb)
        return cb, scb, cols

    return quant


@pytest.fixture(autouse=True)
def bitsandbytes_as_on_the_gpu(monkeypatch):
    """transformers' reference quantizes int8 weights with bitsandbytes' CPU kernel, whose 127 / SCB is
    correctly rounded; fastq follows the CUDA kernel, which takes the GPU's reciprocal. This makes the
    reference's CB the CUDA kernel's, so whole models compare bit for bit and logit for logit;
    tests/test_quantize_bnb.py compares against the CPU kernel itself (its op, unpatched). A test's
    subprocesses get the same with ``env=env_as_on_the_gpu(folder)``."""
    import bitsandbytes.functional as F

    monkeypatch.setattr(F, "int8_vectorwise_quant", int8_quant_as_on_the_gpu(F.int8_vectorwise_quant))


def env_as_on_the_gpu(folder) -> dict:
    """The environment for a test's subprocesses (and theirs) with ``bitsandbytes_as_on_the_gpu`` in
    effect: a ``sitecustomize`` in ``folder``, first on PYTHONPATH, installs it at start-up."""
    tests = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(
            f"import sys; sys.path.insert(0, {tests!r})\n"
            "import bitsandbytes.functional as F, conftest\n"
            "F.int8_vectorwise_quant = conftest.int8_quant_as_on_the_gpu(F.int8_vectorwise_quant)\n"
        )
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder)] + ([path] if path else []))}


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of a packed weight (any storage dtype), first element from the high nibble."""
    b = tensor_bytes(packed)
    return torch.stack([b >> 4, b & 15], 1).reshape(-1).long()


def code_rank(quant_type: str) -> torch.Tensor:
    """Each 4-bit code's rank by value in bitsandbytes' code table (FP4's two zeros share a rank)."""
    import bitsandbytes.functional as F

    values = F.get_4bit_type(quant_type, device="cpu")
    return (values.reshape(-1, 1) > values.reshape(1, -1)).sum(1)


def cpu_codes_apart_by_rule(ours: torch.Tensor, cpu: torch.Tensor, quant_type: str, free=None) -> int:
    """fastq's 4-bit codes (bitsandbytes' CUDA kernel's) against its CPU kernel's, both unpacked:
    asserts they differ only by that kernel's rules - FP4's two zero codes the other way round, one
    code apart where a value lies between a midpoint and the CUDA kernel's literal threshold (or the
    tail is divided there) - or where ``free`` (a mask) lets them; returns how many differ."""
    differ = ours != cpu
    rank = code_rank(quant_type)
    ok = ~differ | ((rank[ours] - rank[cpu]).abs() == 1)
    if quant_type == "fp4":
        ok |= (ours & 7 == 0) & (cpu & 7 == 0)
    if free is not None:
        ok |= free
    assert bool(ok.all()), "a 4-bit code differs from bitsandbytes' CPU kernel's by more than its rules"
    return int(differ.sum())


def assert_quantized_tensors_match(ref: dict, got: dict, double_quant: bool = False) -> None:
    """Tensor by tensor, fastq's quantized tensors (``got``) against transformers' on the CPU (``ref``),
    for every key of ``ref``: the same bytes, except where fastq follows bitsandbytes' CUDA kernel and
    the CPU kernel differs. FP4 packed weights: codes only by that kernel's rules
    (``cpu_codes_apart_by_rule``), on at most 1% of them; NF4 one code apart on at most 1e-4 of them and
    int8 CB one apart only in rows whose SCB's reciprocal the GPU rounds the other way (``gpu_reciprocal``:
    fastq scales as the GPU does, transformers on the CPU by the correctly rounded reciprocal). With ``double_quant``: nested absmax codes
    (``*.weight.absmax`` stored as uint8) one code apart on at most 1% of entries, and the offset and
    nested absmax a few float32 ulps apart (``nested_stat_close``)."""
    nested_total = nested_diff = fp4_total = fp4_diff = nf4_total = nf4_diff = 0
    for key, a in ref.items():
        b = got[key]
        if f"{key}.quant_state.bitsandbytes__fp4" in ref:
            assert b.dtype == a.dtype and b.shape == a.shape, key
            fp4_diff += cpu_codes_apart_by_rule(unpack_4bit(b), unpack_4bit(a), "fp4")
            fp4_total += 2 * a.numel() * a.element_size()
        elif f"{key}.quant_state.bitsandbytes__nf4" in ref:
            assert b.dtype == a.dtype and b.shape == a.shape, key
            nf4_diff += cpu_codes_apart_by_rule(unpack_4bit(b), unpack_4bit(a), "nf4")
            nf4_total += 2 * a.numel() * a.element_size()
        elif key.endswith(".weight") and a.dtype == torch.int8 and key.removesuffix("weight") + "SCB" in ref:
            # CB one apart only in rows whose GPU reciprocal of SCB is not the correctly rounded one
            assert b.dtype == a.dtype and b.shape == a.shape, key
            delta = (a.to(torch.int16) - b.to(torch.int16)).abs()
            rows = reciprocal_differs(ref[key.removesuffix("weight") + "SCB"]).reshape(-1, 1)
            assert bool((delta <= rows.to(torch.int16)).all()), f"{key}: CB differs beyond the GPU's reciprocal"
        elif double_quant and key.endswith(".weight.absmax") and a.dtype == torch.uint8:
            assert b.dtype == torch.uint8 and b.shape == a.shape, key
            delta = (a.to(torch.int16) - b.to(torch.int16)).abs()
            assert int(delta.max()) <= 1, f"{key}: a nested code differs by more than one step"
            nested_total += delta.numel()
            nested_diff += int((delta != 0).sum())
        elif double_quant and nested_stat_close(key, a, b):
            pass
        else:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(tensor_bytes(a), tensor_bytes(b)), (
                f"{key}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)} or bytes differ"
            )
    if double_quant:
        assert nested_total > 0, "no nested codes: is double quantization on?"
        assert nested_diff <= 0.01 * nested_total, f"{nested_diff} of {nested_total} nested codes differ"
    assert fp4_diff <= 0.01 * fp4_total, f"{fp4_diff} of {fp4_total} FP4 codes differ"
    # NF4: one code apart only where the GPU's reciprocal of a block's absmax puts a value across a
    # threshold the correctly rounded one does not (a handful in a million)
    assert nf4_diff <= 1e-4 * nf4_total, f"{nf4_diff} of {nf4_total} NF4 codes differ"


def assert_close_outputs(ref: torch.Tensor, got: torch.Tensor, share: float = 0.01) -> None:
    """Double quant and FP4 only: max |diff| within ``share`` of the logit scale. Double quant (1%): a
    nested code one step off moves one 64-weight block's absmax by one step of the 8-bit dynamic map (a
    small fraction of a percent of that block's scale) in ~0.2% of the blocks; through two layers this
    shows as at most about one bfloat16 ulp of the largest logit (0.016 of 3.9 for BERT, 0.031 of 7.1
    for T5), far below what one flipped 4-bit code per block would cause. FP4 (5%): a weight between a
    midpoint and the CUDA kernel's literal threshold takes the code on the other side (as far from it
    as the CPU kernel's, but FP4's steps are up to a third of the block's scale), in under 0.1% of the
    weights; the zero codes' sign changes no value. These random two-layer models move by 2.2-2.7% of
    the logit scale (0.035 of 1.34-1.62, 0.11 of 5.8)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    scale = float(ref.abs().max())
    err = float((got.float() - ref.float()).abs().max())
    assert err <= share * scale, f"max |diff| {err} exceeds {share:.0%} of the logit scale {scale}"


def build_tiny(family: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A tiny ``family`` model with seeded random weights, in ``dtype``, in eval mode."""
    import transformers

    config = tiny_config(family)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][1])(config)
    with torch.no_grad():  # initializers leave some tensors (biases, norms) at 0/1: make every one count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory ``tiny_model(family, dtype=torch.bfloat16) -> str``: the folder where a tiny model of
    ``family`` (see ``FAMILIES``) was saved by ``save_pretrained`` (config.json + model.safetensors).
    Built once per (family, dtype) and session; treat the folder as read-only."""
    cache: dict[tuple[str, torch.dtype], str] = {}

    def make(family: str, dtype: torch.dtype = torch.bfloat16) -> str:
        key = (family, dtype)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-{str(dtype).removeprefix('torch.')}")
            build_tiny(family, dtype).save_pretrained(folder)
            cache[key] = os.fspath(folder)
        return cache[key]

    return make
