"""Checkpoints whose names transformers 5 converts on load (conversion_mapping.py): renamed tensors
(GPT-NeoX's ``embed_out``, legacy ``LayerNorm.gamma`` / ``beta``), and MoE experts stored one tensor per
expert that the model holds fused (Mixtral, Qwen2-MoE, Qwen3-MoE). fastq loads what transformers loads,
from the same mapping, and ``fastq convert`` writes what ``save_pretrained`` writes."""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import fastq
import pytest
import torch
import transformers
from fastq.dispatch import check_cpu_kernel_shapes
from safetensors.torch import load_file, save_file
from transformers import BitsAndBytesConfig

VOCAB = 256
NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16}
INT8 = {"load_in_8bit": True}
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "max_position_embeddings": 64}
MOE = {**COMMON, "num_key_value_heads": 2, "num_experts_per_tok": 2}
FAMILIES = {
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, {**COMMON, "intermediate_size": 128}),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                {**MOE, "intermediate_size": 128, "num_local_experts": 4}),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  {**MOE, "intermediate_size": 128, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
                   "num_experts": 4}),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  {**MOE, "intermediate_size": 128, "moe_intermediate_size": 64, "num_experts": 4, "head_dim": 16}),
}


def save_family(tmp_path_factory, family: str) -> str:
    """A seeded tiny ``family`` model saved by ``save_pretrained`` (legacy names) in a fresh folder."""
    cfg_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = tmp_path_factory.mktemp(family)
    model.to(torch.bfloat16).save_pretrained(folder)
    return os.fspath(folder)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(family) -> folder``: ``save_family``, once per family and module."""
    cache: dict[str, str] = {}

    def make(family: str) -> str:
        if family not in cache:
            cache[family] = save_family(tmp_path_factory, family)
        return cache[family]

    return make


def _ids():
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def _reference(folder, cfg):
    """transformers' model, with the layers bitsandbytes' AVX512-BF16 CPU kernel refuses (a router of
    one output, tests/test_dispatch.py) on its generic kernel, as fastq routes them."""
    quant = {"quantization_config": BitsAndBytesConfig(**cfg)} if cfg else {}  # None: pre-quantized
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.bfloat16, **quant)
    check_cpu_kernel_shapes(model)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("cfg", [NF4, INT8], ids=["nf4", "int8"])
def test_load_equals_transformers(saved, family, cfg):
    folder = saved(family)
    keys = set(load_file(os.path.join(folder, "model.safetensors")))
    assert family != "gpt_neox" or "embed_out.weight" in keys
    assert "moe" not in family and family != "mixtral" or any(".experts.0." in k for k in keys)
    ref = _reference(folder, cfg)
    got = fastq.load(folder, BitsAndBytesConfig(**cfg), "cpu", dtype=torch.bfloat16, progress=False)
    a, b = ref.state_dict(), got.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k
    with torch.no_grad():
        assert torch.equal(ref(_ids()).logits, got(_ids()).logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_convert_writes_what_save_pretrained_writes(saved, family, tmp_path):
    folder = saved(family)
    ref_dir, got_dir = tmp_path / "ref", tmp_path / "got"
    _reference(folder, NF4).save_pretrained(ref_dir)
    fastq.convert(folder, got_dir, BitsAndBytesConfig(**NF4), progress=False)
    assert filecmp.cmp(ref_dir / "model.safetensors", got_dir / "model.safetensors", shallow=False)
    # and both read it back
    back = fastq.load(got_dir, None, "cpu", progress=False)
    with torch.no_grad():
        assert torch.equal(back(_ids()).logits, _reference(ref_dir, None)(_ids()).logits)


def test_legacy_layernorm_gamma_beta(tmp_path):
    """Old BERT checkpoints call LayerNorm weights gamma / beta; transformers' "legacy" renames apply."""
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    t = load_file(path)
    t = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in t.items()}
    assert any(k.endswith("LayerNorm.gamma") for k in t)
    save_file(t, path, metadata={"format": "pt"})
    ref = transformers.AutoModel.from_pretrained(tmp_path / "m", quantization_config=BitsAndBytesConfig(**NF4),
                                                 device_map="cpu", dtype=torch.bfloat16)
    got = fastq.load(tmp_path / "m", BitsAndBytesConfig(**NF4), "cpu", dtype=torch.bfloat16, progress=False)
    a, b = ref.state_dict(), got.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_fused_experts_are_gathered_by_the_rust_readers(saved, tmp_path):
    """The plan holds a fused expert tensor as pieces of the checkpoint's per-expert tensors, written to
    their byte offsets (no tensor is concatenated in Python); the pieces cover the buffer exactly."""
    folder = saved("mixtral")
    prepared = fastq.loader.prepare(folder, BitsAndBytesConfig(**NF4))
    e = next(e for e in prepared.plan.entries if e.name.endswith("layers.0.mlp.experts.gate_up_proj"))
    assert e.shape == (4, 256, 64)
    names = [p[0] for p in e.pieces]
    assert names == [f"model.layers.0.block_sparse_moe.experts.{i}.{w}.weight" for i in range(4) for w in ("w1", "w3")]
    offsets = [p[1] for p in e.pieces]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] + e.pieces[-1][2] == e.nbytes
    assert all(a[1] + a[2] == b[1] for a, b in zip(e.pieces, e.pieces[1:]))
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_sharded_moe_checkpoint(saved, tmp_path):
    """Experts spread over several shards are gathered across files."""
    cfg_cls, model_cls, kw = FAMILIES["qwen3_moe"]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kw)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    assert len(list(Path(tmp_path / "m").glob("*.safetensors"))) > 2
    ref = _reference(tmp_path / "m", NF4)
    got = fastq.load(tmp_path / "m", BitsAndBytesConfig(**NF4), "cpu", dtype=torch.bfloat16, progress=False)
    with torch.no_grad():
        assert torch.equal(ref(_ids()).logits, got(_ids()).logits)


@pytest.mark.parametrize("name", ["vit", "deit"])
def test_vision_families_renamed_in_transformers_5(tmp_path, name):
    cfg_cls, model_cls = {"vit": (transformers.ViTConfig, transformers.ViTModel),
                          "deit": (transformers.DeiTConfig, transformers.DeiTModel)}[name]
    cfg = cfg_cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    model_cls(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    ref = transformers.AutoModel.from_pretrained(tmp_path / "m", quantization_config=BitsAndBytesConfig(**NF4),
                                                 device_map="cpu", dtype=torch.bfloat16)
    check_cpu_kernel_shapes(ref)
    got = fastq.load(tmp_path / "m", BitsAndBytesConfig(**NF4), "cpu", dtype=torch.bfloat16, progress=False)
    a, b = ref.state_dict(), got.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ref(pixel_values=pixels).last_hidden_state, got(pixel_values=pixels).last_hidden_state)


# More decoder families, each built tiny from its transformers config, loaded by both, compared.
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 64}
MATRIX = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 4, "pad_token_id": 0}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 1, "head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"num_key_value_heads": 2, "head_dim": 16}),
    "falcon": ("FalconConfig", "FalconForCausalLM", {}),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 64}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {"num_key_value_heads": 4}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {"num_key_value_heads": 2}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {"num_key_value_heads": 4}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_key_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2}),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", {"num_key_value_heads": 2, "num_local_experts": 4,
                                                     "num_experts_per_tok": 2}),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", {"num_key_value_heads": 2, "num_local_experts": 4,
                                                                 "num_experts_per_tok": 2}),
}


def matrix_model(family: str) -> torch.nn.Module:
    """A seeded tiny ``family`` of ``MATRIX`` (the test skips where transformers lacks the class)."""
    cfg_name, cls_name, extra = MATRIX[family]
    cfg_cls, model_cls = getattr(transformers, cfg_name, None), getattr(transformers, cls_name, None)
    if cfg_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    torch.manual_seed(0)
    return model_cls(cfg_cls(**{**BASE, **extra}))


@pytest.mark.parametrize("family", list(MATRIX))
def test_family_matrix_loads_like_transformers(tmp_path, family):
    model = matrix_model(family)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    ref = _reference(tmp_path / "m", NF4)
    got = fastq.load(tmp_path / "m", BitsAndBytesConfig(**NF4), "cpu", dtype=torch.bfloat16, progress=False)
    a, b = ref.state_dict(), got.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k
    with torch.no_grad():
        assert torch.equal(ref(_ids()).logits, got(_ids()).logits)
