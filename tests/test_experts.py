"""MoE experts quantized, opt-in (``quantize_experts=True``): each expert quantized alone, bytes equal to
bitsandbytes' own quantizer on that expert; the forward on bitsandbytes' dequantization equals the same
MoE run with the dequantized weights; the default stays transformers' model (bf16 experts)."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bf
import fastq
import pytest
import torch
import transformers
from fastq.dispatch import check_cpu_kernel_shapes
from fastq.experts import QuantizedExperts
from test_architectures import NF4, _ids, save_family

INT8 = {"load_in_8bit": True}
MOE = ["mixtral", "qwen3_moe", "qwen2_moe"]


def _folder(tmp_path_factory, family):
    return save_family(tmp_path_factory, family)


def _experts(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedExperts)}


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("cfg", [NF4, INT8], ids=["nf4", "int8"])
def test_experts_are_quantized_per_expert_like_bitsandbytes(tmp_path_factory, family, cfg):
    folder = _folder(tmp_path_factory, family)
    # transformers' model (experts stay bf16) on the eager experts loop, the one QuantizedExperts runs
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=transformers.BitsAndBytesConfig(**cfg), device_map="cpu", dtype=torch.bfloat16,
        experts_implementation="eager",
    )
    check_cpu_kernel_shapes(ref)
    qcfg = fastq.QuantConfig.coerce(transformers.BitsAndBytesConfig(**cfg))
    got = fastq.load(folder, fastq.QuantConfig(**{**qcfg.__dict__, "quantize_experts": True}), "cpu",
                     dtype=torch.bfloat16, progress=False)
    experts = _experts(got)
    assert len(experts) == 2  # one per layer
    for name, q in experts.items():
        fused = ref.get_submodule(name)
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(fused, proj).detach()
            data = getattr(q, proj)
            for e in range(w.shape[0]):
                if cfg is NF4:
                    packed, state = bf.quantize_4bit(w[e].contiguous(), blocksize=64, quant_type="nf4",
                                                     compress_statistics=False)
                    assert data.dtype == torch.uint8 and torch.equal(data[e], packed.reshape(-1)), (name, proj, e)
                    assert torch.equal(q._buffers[f"{proj}_absmax"][e], state.absmax)
                else:
                    cb, scb, _ = bf.int8_vectorwise_quant(w[e].to(torch.float16))
                    assert data.dtype == torch.int8 and torch.equal(data[e], cb)
                    assert torch.equal(q._buffers[f"{proj}_SCB"][e], scb)
            # transformers' experts given the dequantized weights: the reference MoE
            deq = torch.stack([q.weight(proj, e) for e in range(w.shape[0])])
            getattr(fused, proj).data = deq
    with torch.no_grad():
        assert torch.equal(got(_ids()).logits, ref(_ids()).logits)


def test_quantized_experts_take_less_memory(tmp_path_factory):
    folder = _folder(tmp_path_factory, "mixtral")
    plain = fastq.load(folder, fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "cpu", progress=False)
    small = fastq.load(folder, fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", quantize_experts=True),
                       "cpu", progress=False)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in plain.named_parameters() if ".experts." in n)
    saved = plain.get_memory_footprint() - small.get_memory_footprint()
    # 4 bits + a float32 absmax per 64 of 16-bit values: 3/4 of the experts' bytes, less the statistics
    assert saved == pytest.approx(expert_bytes * (1 - 0.25 - 4 / 64 / 2), rel=1e-6)
    assert not _experts(plain) and len(_experts(small)) == 2


def test_default_leaves_experts_as_transformers_does(tmp_path_factory):
    folder = _folder(tmp_path_factory, "qwen3_moe")
    got = fastq.load(folder, transformers.BitsAndBytesConfig(**NF4), "cpu", dtype=torch.bfloat16, progress=False)
    assert not _experts(got)
    assert any(n.endswith("experts.gate_up_proj") and p.dtype == torch.bfloat16 for n, p in got.named_parameters())


def test_quantize_experts_refuses_what_it_cannot_write(tmp_path_factory, tmp_path):
    folder = _folder(tmp_path_factory, "mixtral")
    cfg = fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", quantize_experts=True)
    with pytest.raises(fastq.ConfigError, match="quantize_experts has no checkpoint format"):
        fastq.convert(folder, tmp_path / "out", cfg, progress=False)
    model = fastq.load(folder, cfg, "cpu", progress=False)
    with pytest.raises(fastq.UnsavableModelError, match="quantize_experts"):
        fastq.save(model, tmp_path / "saved")
    assert not (tmp_path / "out").exists() and not (tmp_path / "saved").exists()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # attention stays bitsandbytes'
