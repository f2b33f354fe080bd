"""Device maps over the bytes a quantized model holds: a 7B-shaped skeleton (meta tensors, no memory)
planned for two GPUs through accelerate's planner with any max_memory (no GPU needed). "auto" and
"balanced" split it within one decoder layer of even and no budget is exceeded, counted in exact bytes
(packed weights and their statistics)."""

from __future__ import annotations

from collections import defaultdict

import fastq
import pytest
import torch
import transformers
from accelerate import init_empty_weights
from fastq import device_map as dmod
from fastq.skeleton import no_init, replace_modules

CONFIGS = {
    "nf4": fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "nf4-dq": fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": fastq.QuantConfig(load_in_8bit=True),
}
GiB = 2**30


def _skeleton(cfg):
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                      num_hidden_layers=32, vocab_size=32000)
    with init_empty_weights(), no_init():
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    hfq = replace_modules(model, cfg, None, torch.bfloat16)
    return model, hfq


def _held(model) -> dict[str, int]:
    q = dmod.quantized_sizes(model)
    return {n: sum(q[n]) if n in q else p.numel() * p.element_size() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("strategy", ["auto", "balanced"])
def test_balanced_within_one_layer_and_budgets_hold(name, strategy):
    model, hfq = _skeleton(CONFIGS[name])
    held = _held(model)
    layer = sum(v for n, v in held.items() if n.startswith("model.layers.0."))
    total = sum(held.values())
    for budget in (total * 0.6, total * 1.5):  # tight (a split is forced) and roomy
        dm = dmod.resolve(model, strategy, {0: int(budget), 1: int(budget)}, hfq)
        per = defaultdict(int)
        for n, v in held.items():
            per[dmod.device_of(n, dm)] += v
        assert set(per) == {"cuda:0", "cuda:1"}, dict(per)
        assert abs(per["cuda:0"] - per["cuda:1"]) <= layer, {k: v / GiB for k, v in per.items()}
        assert max(per.values()) <= budget


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sequential_fills_the_first_gpu_within_its_budget(name):
    model, hfq = _skeleton(CONFIGS[name])
    held = _held(model)
    total = sum(held.values())
    budget = int(total * 0.7)
    dm = dmod.resolve(model, "sequential", {0: budget, 1: budget}, hfq)
    per = defaultdict(int)
    for n, v in held.items():
        per[dmod.device_of(n, dm)] += v
    assert per["cuda:0"] <= budget and per["cuda:1"] <= budget
    assert per["cuda:0"] > per["cuda:1"]  # sequential: the first GPU first


def test_sizes_count_packed_bytes_and_statistics():
    model, _ = _skeleton(CONFIGS["nf4-dq"])
    packed, stats = dmod.quantized_sizes(model)["model.layers.0.mlp.up_proj.weight"]
    n = 11008 * 4096
    assert packed == n // 2
    assert stats == n // 64 + (n // 64 // 256) * 4 + 256 * 4 + 16 * 4  # absmax codes, nested absmax, maps
    int8, _ = _skeleton(CONFIGS["int8"])
    assert dmod.quantized_sizes(int8)["model.layers.0.mlp.up_proj.weight"] == (n, 11008 * 4)
