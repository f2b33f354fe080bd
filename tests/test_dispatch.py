"""What the last stage of a load checks that bitsandbytes would only find at the first forward: 4-bit
layers its AVX512-BF16 CPU kernel refuses (routed to its generic kernel, same numbers), layers whose
rows cross absmax blocks (a warning), and NaN in unquantized weights (a warning naming the tensor)."""

from __future__ import annotations

import os
import shutil

import bitsandbytes as bnb
import fastq
import pytest
import torch
import transformers
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from transformers import BitsAndBytesConfig

NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def narrow_kv(tmp_path_factory) -> str:
    """A tiny llama whose k_proj / v_proj have 16 outputs (8 heads of 16, one KV head): not a multiple of
    the 32 rows bitsandbytes' AVX512-BF16 CPU kernel packs together."""
    config = tiny_config("llama")
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, 1, 16
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = tmp_path_factory.mktemp("narrow-kv")
    model.to(torch.bfloat16).save_pretrained(folder)
    return os.fspath(folder)


def test_layers_the_cpu_kernel_refuses_run_on_the_generic_one(narrow_kv):
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    got = fastq.load(narrow_kv, NF4, "cpu", progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(narrow_kv, quantization_config=NF4, device_map="cpu")
    fast_kernel = bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu
    narrow = [n for n, m in got.named_modules() if isinstance(m, bnb.nn.Linear4bit) and m.out_features == 16]
    assert len(narrow) == 4  # k_proj, v_proj of 2 layers
    for name, m in got.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert m.support_avx512bf16_for_cpu == (bool(fast_kernel) and name not in narrow), name
    if fast_kernel:  # what transformers' model does on this CPU: bitsandbytes' assertion
        with torch.no_grad(), pytest.raises(AssertionError, match="N must be divisible by block_n"):
            ref(ids)
        for name in narrow:
            ref.get_submodule(name).support_avx512bf16_for_cpu = False
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)


def test_rows_crossing_blocks_are_warned_about(tiny_model):
    # Only bitsandbytes' AVX512-BF16 kernel requires it (its fallback decodes such weights right).
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes' CPU kernel that needs in_features % blocksize == 0 runs only with AVX512-BF16")
    cfg = fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", blocksize=256)  # in_features 128
    with pytest.warns(UserWarning, match="not a multiple of the blocksize"):
        fastq.load(tiny_model("llama"), cfg, "cpu", progress=False)


def test_nan_in_a_norm_weight_is_warned_about_by_name(tiny_model, tmp_path):
    folder = tmp_path / "nan"
    shutil.copytree(tiny_model("llama"), folder)
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 weight\(s\) hold NaN or infinity: model\.norm\.weight"):
        model = fastq.load(folder, NF4, "cpu", progress=False)
    with torch.no_grad():
        assert torch.isnan(model(torch.tensor([[1, 2, 3]])).logits).all()  # what the warning says


def test_a_clean_model_gives_no_warning(tiny_model, recwarn):
    fastq.load(tiny_model("llama"), NF4, "cpu", progress=False)
    assert not [w for w in recwarn if "NaN" in str(w.message) or "blocksize" in str(w.message)]

