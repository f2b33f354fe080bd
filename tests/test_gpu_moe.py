"""On a GPU: checkpoints transformers converts on load (renamed tensors, fused MoE experts gathered
through the pinned ring) equal transformers + bitsandbytes on the same GPU, byte for byte; and
``quantize_experts`` quantizes each expert with bitsandbytes' CUDA kernels. Skipped without CUDA; run on
the lent GPU machine by benches/gpu/run.sh."""

from __future__ import annotations

import bitsandbytes.functional as bf
import fastq
import pytest
import torch
import transformers
from fastq.experts import QuantizedExperts
from test_architectures import FAMILIES, NF4, _ids, save_family

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
INT8 = {"load_in_8bit": True}


def _folder(tmp_path_factory, family):
    return save_family(tmp_path_factory, family)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _ref(folder, cfg, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=transformers.BitsAndBytesConfig(**cfg), device_map={"": 0}, dtype=torch.bfloat16,
        **kw,
    )


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("cfg", [NF4, INT8], ids=["nf4", "int8"])
def test_converted_families_equal_transformers_on_the_gpu(tmp_path_factory, family, cfg):
    folder = _folder(tmp_path_factory, family)
    ref = _ref(folder, cfg)
    got = fastq.load(folder, transformers.BitsAndBytesConfig(**cfg), {"": 0}, dtype=torch.bfloat16, progress=False)
    a, b = ref.state_dict(), got.state_dict()
    assert set(a) == set(b)
    for k in a:  # (quant_state JSON and weight_format entries are made on the CPU by bitsandbytes)
        assert a[k].device == b[k].device, k
        assert torch.equal(_bytes(a[k]), _bytes(b[k])), k
    assert all(p.device.type == "cuda" for p in got.parameters())
    with torch.no_grad():
        assert torch.equal(ref(_ids().cuda()).logits, got(_ids().cuda()).logits)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("cfg", [NF4, INT8], ids=["nf4", "int8"])
def test_quantize_experts_on_the_gpu(tmp_path_factory, family, cfg):
    folder = _folder(tmp_path_factory, family)
    ref = _ref(folder, cfg, experts_implementation="eager")
    qcfg = fastq.QuantConfig.coerce(transformers.BitsAndBytesConfig(**cfg))
    got = fastq.load(folder, fastq.QuantConfig(**{**qcfg.__dict__, "quantize_experts": True}), {"": 0},
                     dtype=torch.bfloat16, progress=False)
    experts = {n: m for n, m in got.named_modules() if isinstance(m, QuantizedExperts)}
    assert len(experts) == 2
    for name, q in experts.items():
        fused = ref.get_submodule(name)
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(fused, proj).detach()
            data = getattr(q, proj)
            assert data.device.type == "cuda"
            for e in range(w.shape[0]):
                if cfg is NF4:
                    packed, state = bf.quantize_4bit(w[e].contiguous(), blocksize=64, quant_type="nf4")
                    assert torch.equal(data[e], packed.reshape(-1)) and torch.equal(q._buffers[f"{proj}_absmax"][e], state.absmax)
                else:
                    cb, scb, _ = bf.int8_vectorwise_quant(w[e].to(torch.float16))
                    assert torch.equal(data[e], cb) and torch.equal(q._buffers[f"{proj}_SCB"][e], scb)
            getattr(fused, proj).data = torch.stack([q.weight(proj, e) for e in range(w.shape[0])])
    with torch.no_grad():
        assert torch.equal(got(_ids().cuda()).logits, ref(_ids().cuda()).logits)
