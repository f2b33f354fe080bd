"""``fastq.load`` against transformers' ``from_pretrained`` + bitsandbytes (CPU backend), family by family.

Every comparison loads the same folder twice - once with transformers and the same ``BitsAndBytesConfig``,
dtype and ``device_map="cpu"``, once with fastq - and asks for the same modules, the same state_dict
bytes and bit-identical outputs. The exceptions are FP4, whose codes fastq takes from bitsandbytes' CUDA
kernel where its CPU kernel differs (``conftest.cpu_codes_apart_by_rule``), and double quantization
(``bnb_4bit_use_double_quant``): fastq's nested 8-bit codes follow bitsandbytes' CUDA kernel (what a
GPU-quantized checkpoint holds, checked against a CUDA fixture in test_quantize_bnb.py) while
bitsandbytes' CPU kernel goes through a 65,536-entry lookup table that rounds ~0.2% of those codes one
step the other way, and fastq's offset is the GPU's float32 mean where bitsandbytes' CPU one sums in
torch's CPU order, a few ulps away; ``assert_same_state`` bounds those differences and
``assert_close_outputs`` explains the logit tolerance.

State dicts are compared before a model's first forward pass: bitsandbytes' CPU backend repacks 4-bit
weights for its gemm on first use and from then on saves ``absmax`` as a bfloat16 [2, n/2] tensor
(transformers' model and fastq's alike), so a model is compared at most once after it ran.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import bitsandbytes
import fastq
import pytest
import torch
import transformers
from accelerate import init_empty_weights
from accelerate.utils import BnbQuantizationConfig
from conftest import (
    FAMILIES,
    VOCAB,
    assert_close_outputs,
    assert_quantized_tensors_match,
    auto_class,
    tiny_config,
)
from fastq.device_map import check_offload
from transformers import BitsAndBytesConfig

DTYPE = torch.bfloat16

#: BitsAndBytesConfig arguments by name. "fp4" keeps transformers' default compute dtype (float32).
CONFIGS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": DTYPE},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "nf4-dq": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": DTYPE,
    },
    "int8": {"load_in_8bit": True},
}

#: The transformers auto class that loads each family's saved architecture.
AUTO = {family: auto_class(family) for family in FAMILIES}

# Every config for every family: a tiny model loads in well under a second.
MATRIX = [(family, name) for family in AUTO for name in CONFIGS]


def bnb(name: str, **extra) -> BitsAndBytesConfig:
    """A fresh BitsAndBytesConfig (transformers may extend its lists while loading)."""
    return BitsAndBytesConfig(**CONFIGS[name], **extra)


def reference(folder: str, family: str, quantization_config=None, **kwargs):
    """transformers' own load of ``folder``: the model every fastq result is compared with."""
    kwargs.setdefault("device_map", "cpu")
    kwargs.setdefault("dtype", DTYPE)
    if quantization_config is not None:  # an explicit None makes transformers 5 ignore a saved config
        kwargs["quantization_config"] = quantization_config
    return AUTO[family].from_pretrained(folder, **kwargs)


def load(folder: str, cfg=None, device_map="cpu", **kwargs):
    kwargs.setdefault("dtype", DTYPE)
    return fastq.load(folder, cfg, device_map, progress=False, **kwargs)


def inputs(family: str) -> dict:
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    if family == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids}


def outputs(model, family: str) -> torch.Tensor:
    """The logits (last_hidden_state for BERT) of ``model`` on a fixed batch."""
    with torch.no_grad():
        out = model(**inputs(family))
    return out.last_hidden_state if family == "bert" else out.logits


def module_types(model) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def assert_same_state(ref: dict, got: dict, double_quant: bool = False) -> None:
    """The same keys in the same order and the same bytes but where fastq follows bitsandbytes' CUDA
    kernel (``conftest.assert_quantized_tensors_match``; see the module docstring)."""
    assert list(got) == list(ref)
    assert_quantized_tensors_match(ref, got, double_quant)


def assert_same_model(ref, got, family: str, double_quant: bool = False) -> None:
    assert type(got) is type(ref)
    assert module_types(got) == module_types(ref)
    state = ref.state_dict()
    assert_same_state(state, got.state_dict(), double_quant)
    assert got.get_memory_footprint() == ref.get_memory_footprint()
    out_ref, out_got = outputs(ref, family), outputs(got, family)
    if any(".quant_state.bitsandbytes__fp4" in k for k in state):
        assert_close_outputs(out_ref, out_got, share=0.05)
    elif double_quant:
        assert_close_outputs(out_ref, out_got)
    else:
        assert torch.equal(out_got, out_ref)


# -- each family, each config ----------------------------------------------------------------------


@pytest.mark.parametrize(("family", "name"), MATRIX, ids=[f"{f}-{n}" for f, n in MATRIX])
def test_quantized_load_equals_transformers(tiny_model, family, name):
    folder = tiny_model(family)
    ref = reference(folder, family, bnb(name))
    got = load(folder, bnb(name))
    layer = bitsandbytes.nn.Linear8bitLt if name == "int8" else bitsandbytes.nn.Linear4bit
    assert sum(isinstance(m, layer) for m in got.modules()) >= 2 * 4, "the layers are quantized"
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        assert getattr(got, flag, False) == getattr(ref, flag, False), flag
    assert_same_model(ref, got, family, double_quant=name == "nf4-dq")


DTYPE_CASES = [
    ("llama", torch.float32, torch.float32, "nf4"),
    ("llama", torch.float32, torch.float32, "int8"),
    ("llama", torch.float32, torch.bfloat16, "nf4"),
    ("llama", torch.float32, torch.bfloat16, "nf4-dq"),
    ("llama", torch.float32, torch.bfloat16, "int8"),
    ("gpt2", torch.float32, torch.bfloat16, "nf4"),
    ("gpt2", torch.float32, torch.bfloat16, "int8"),
    ("llama", torch.bfloat16, torch.float32, "nf4"),
    ("llama", torch.bfloat16, torch.float32, "int8"),
]


@pytest.mark.parametrize(
    ("family", "stored", "dtype", "name"),
    DTYPE_CASES,
    ids=[f"{f}-{str(s)[6:]}-as-{str(d)[6:]}-{n}" for f, s, d, n in DTYPE_CASES],
)
def test_checkpoint_dtype_other_than_the_model_dtype(tiny_model, family, stored, dtype, name):
    """transformers quantizes a weight materialized in the model's dtype: a float32 checkpoint loaded
    as bfloat16 is quantized from bfloat16 values, and its QuantState says bfloat16."""
    folder = tiny_model(family, stored)
    ref = reference(folder, family, bnb(name), dtype=dtype)
    got = load(folder, bnb(name), dtype=dtype)
    assert got.dtype == dtype
    assert_same_model(ref, got, family, double_quant=name == "nf4-dq")


@pytest.mark.parametrize("name", ["nf4-dq", "int8"])
def test_fastq_model_saved_loads_in_transformers_with_the_same_outputs(tiny_model, tmp_path, name):
    """The double-quant tolerance is in the bytes only: transformers running fastq's own bytes gives
    bit-identical logits."""
    got = load(tiny_model("llama"), bnb(name))
    got.save_pretrained(tmp_path)
    again = reference(os.fspath(tmp_path), "llama")
    assert_same_state(got.state_dict(), again.state_dict())
    assert torch.equal(outputs(again, "llama"), outputs(got, "llama"))


@pytest.mark.parametrize(("family", "name"), [("llama", "nf4"), ("gpt2", "int8"), ("t5", "nf4")])
def test_generate_gives_the_same_tokens_as_transformers(tiny_model, family, name):
    folder = tiny_model(family)
    ref, got = reference(folder, family, bnb(name)), load(folder, bnb(name))
    prompt = inputs(family)["input_ids"][:1, :6]
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    tokens = got.generate(prompt, **kwargs)
    assert torch.equal(tokens, ref.generate(prompt, **kwargs))
    assert tokens.shape[1] > (1 if family == "t5" else prompt.shape[1])


# -- pre-quantized checkpoints -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prequantized(tiny_model, tmp_path_factory):
    """Factory ``prequantized(family, name) -> folder``: transformers quantized the tiny model with
    config ``name`` and saved it with save_pretrained."""
    cache: dict[tuple[str, str], str] = {}

    def make(family: str, name: str) -> str:
        if (family, name) not in cache:
            folder = tmp_path_factory.mktemp(f"pre-{family}-{name}")
            reference(tiny_model(family), family, bnb(name)).save_pretrained(folder)
            cache[family, name] = os.fspath(folder)
        return cache[family, name]

    return make


PREQUANTIZED = [("llama", name) for name in CONFIGS] + [("gpt2", "nf4-dq"), ("gpt2", "int8"), ("t5", "int8")]


@pytest.mark.parametrize(("family", "name"), PREQUANTIZED, ids=[f"{f}-{n}" for f, n in PREQUANTIZED])
def test_prequantized_checkpoint_loads_without_config(prequantized, family, name):
    folder = prequantized(family, name)
    assert "quantization_config" in json.loads(Path(folder, "config.json").read_text())
    ref = AUTO[family].from_pretrained(folder, device_map="cpu")  # no dtype: transformers' default
    got = fastq.load(folder, progress=False)  # no cfg, no device map, no dtype
    assert got.dtype == ref.dtype == DTYPE
    # Both read the same bytes, so even double-quantized checkpoints are identical.
    assert_same_model(ref, got, family)


def test_config_passed_with_prequantized_checkpoint_warns_and_is_ignored(prequantized):
    folder = prequantized("llama", "nf4")
    expected = fastq.load(folder, progress=False)
    with pytest.warns(UserWarning, match="already quantized"):
        got = fastq.load(folder, bnb("int8"), progress=False)
    assert got.is_loaded_in_4bit and not got.is_loaded_in_8bit
    assert_same_model(expected, got, "llama")


def test_the_checkpoints_own_config_passed_again_is_not_an_override(prequantized, recwarn):
    folder = prequantized("llama", "nf4-dq")
    load(folder, bnb("nf4-dq"))
    assert not [w for w in recwarn if "already quantized" in str(w.message)]


# -- no quantization -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_plain_checkpoint_without_config_is_not_quantized(tiny_model, family):
    folder = tiny_model(family)
    ref = AUTO[family].from_pretrained(folder, device_map="cpu")
    got = fastq.load(folder, progress=False)
    assert not getattr(got, "is_loaded_in_4bit", False) and not getattr(got, "is_loaded_in_8bit", False)
    assert got.dtype == ref.dtype == DTYPE
    assert_same_model(ref, got, family)


def test_plain_float32_checkpoint_without_config(tiny_model):
    folder = tiny_model("llama", torch.float32)
    ref = reference(folder, "llama", dtype=None)
    got = fastq.load(folder, progress=False)
    assert got.dtype == ref.dtype == torch.float32
    assert_same_model(ref, got, "llama")


# -- which modules are quantized -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_llm_int8_skip_modules_as_transformers(tiny_model, name):
    folder = tiny_model("llama")
    skip = ["down_proj", "model.layers.1.self_attn"]  # a suffix and a prefix
    ref = reference(folder, "llama", bnb(name, llm_int8_skip_modules=skip))
    got = load(folder, bnb(name, llm_int8_skip_modules=skip))
    assert type(got.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(got.model.layers[1].self_attn.q_proj) is torch.nn.Linear
    # A given list replaces the default skips, so lm_head is quantized too, as in transformers.
    assert type(got.lm_head) is not torch.nn.Linear
    assert_same_model(ref, got, "llama")


def test_accelerate_skip_modules_as_transformers_llm_int8_skip_modules(tiny_model):
    folder = tiny_model("llama")
    ref = reference(folder, "llama", bnb("nf4", llm_int8_skip_modules=["up_proj", "lm_head"]))
    got = load(folder, fastq.QuantConfig(**CONFIGS["nf4"], skip_modules=["up_proj", "lm_head"]))
    assert type(got.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert_same_model(ref, got, "llama")


def test_keep_in_fp32_modules_as_transformers_strict_fp32(tiny_model, monkeypatch):
    """accelerate's keep_in_fp32_modules: not quantized and float32. transformers' equivalent is a model
    class with the module in ``_keep_in_fp32_modules`` (not quantized: T5 has ["wo"]) and in
    ``_keep_in_fp32_modules_strict`` (float32 under bfloat16). T5 casts its input to wo's dtype, so it runs."""
    folder = tiny_model("t5")
    got = load(folder, fastq.QuantConfig(**CONFIGS["nf4"], keep_in_fp32_modules=["wo"]))
    monkeypatch.setattr(transformers.T5ForConditionalGeneration, "_keep_in_fp32_modules_strict", ["wo"])
    ref = reference(folder, "t5", bnb("nf4"))
    wo = got.encoder.block[0].layer[1].DenseReluDense.wo
    assert type(wo) is torch.nn.Linear and wo.weight.dtype == torch.float32
    assert_same_model(ref, got, "t5")


def test_keep_in_fp32_modules_on_llama_give_transformers_modules(tiny_model, monkeypatch):
    """Module types and dtypes only: Llama's MLP does not cast its input for a float32 down_proj, so
    neither transformers' model nor fastq's can run forward with it (the same RuntimeError)."""
    folder = tiny_model("llama")
    got = load(folder, fastq.QuantConfig(**CONFIGS["int8"], keep_in_fp32_modules=["down_proj"]))
    cls = transformers.LlamaForCausalLM
    monkeypatch.setattr(cls, "_keep_in_fp32_modules", ["down_proj"])
    monkeypatch.setattr(cls, "_keep_in_fp32_modules_strict", ["down_proj"])
    ref = reference(folder, "llama", bnb("int8"))
    assert got.model.layers[1].mlp.down_proj.weight.dtype == torch.float32
    assert module_types(got) == module_types(ref)
    assert_same_state(ref.state_dict(), got.state_dict())


# -- every accepted form of cfg ------------------------------------------------------------------------


def _cfg_forms():
    return {
        "QuantConfig": fastq.QuantConfig(**CONFIGS["nf4"]),
        "BitsAndBytesConfig": bnb("nf4"),
        "BnbQuantizationConfig": BnbQuantizationConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPE, torch_dtype=DTYPE
        ),
        "dict": dict(CONFIGS["nf4"]),
        "config.json dict": bnb("nf4").to_dict(),
    }


@pytest.mark.parametrize("form", list(_cfg_forms()))
def test_every_config_form_gives_transformers_model(tiny_model, form):
    folder = tiny_model("llama")
    ref = reference(folder, "llama", bnb("nf4"))
    got = fastq.load(
        folder, _cfg_forms()[form], "cpu", progress=False
    )  # dtype from the config or config.json
    assert_same_model(ref, got, "llama")


# -- accelerate's load_and_quantize_model --------------------------------------------------------------


def _empty_llama():
    """As accelerate's quantization guide builds it."""
    with init_empty_weights():
        return transformers.LlamaForCausalLM(tiny_config("llama"))


ACCELERATE = {
    "nf4": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": DTYPE,
        "torch_dtype": DTYPE,
    },
    "int8": {"load_in_8bit": True, "torch_dtype": DTYPE},
}


@pytest.mark.parametrize("name", list(ACCELERATE))
def test_load_and_quantize_model_as_accelerate_guide(tiny_model, name):
    from accelerate.utils import load_and_quantize_model as accelerate_load_and_quantize_model

    folder = tiny_model("llama")
    # accelerate's own refuses on a machine without a GPU: 4-bit with any CPU map ("Some modules are
    # dispatched on the CPU or the disk"), 8-bit when Int8Params moves to device 0 (no NVIDIA driver).
    with pytest.raises((ValueError, RuntimeError), match="dispatched on the CPU|NVIDIA|GPU"):
        accelerate_load_and_quantize_model(
            _empty_llama(),
            BnbQuantizationConfig(**ACCELERATE[name]),
            weights_location=folder,
            device_map={"": "cpu"},
        )
    # So fastq's is compared with fastq.load and with transformers (the same modules for Llama: accelerate
    # skips the tied and last modules, transformers the tied and output embeddings; both mean lm_head).
    for ref in (load(folder, bnb(name)), reference(folder, "llama", bnb(name))):
        got = fastq.load_and_quantize_model(
            _empty_llama(),
            BnbQuantizationConfig(**ACCELERATE[name]),
            weights_location=folder,
            device_map={"": "cpu"},
        )
        assert got.model.embed_tokens.weight.dtype == DTYPE  # torch_dtype, though the empty model is float32
        assert_same_model(ref, got, "llama")


# -- device maps on a CPU-only machine ---------------------------------------------------------------------

LLAMA_MODULES = ["model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]


@pytest.mark.parametrize(
    "device_map",
    [None, "cpu", {"": "cpu"}, dict.fromkeys(LLAMA_MODULES, "cpu"), "auto", "balanced", "sequential"],
    ids=["None", "cpu", "catch-all", "per-module", "auto", "balanced", "sequential"],
)
def test_cpu_device_maps(tiny_model, device_map):
    folder = tiny_model("llama")
    ref = reference(folder, "llama", bnb("nf4"))
    got = load(folder, bnb("nf4"), device_map)
    assert {p.device.type for p in got.parameters()} == {"cpu"}
    assert_same_model(ref, got, "llama")


def test_disk_offload_of_unquantized_modules(tiny_model, tmp_path):
    """With llm_int8_enable_fp32_cpu_offload, modules mapped to cpu/disk stay unquantized (transformers'
    rule; on a machine without a GPU that is every module), weights mapped to disk go to offload_folder."""
    folder = tiny_model("llama")
    device_map = {**dict.fromkeys(LLAMA_MODULES, "cpu"), "model.embed_tokens": "disk", "lm_head": "disk"}
    cfg = bnb("nf4", llm_int8_enable_fp32_cpu_offload=True)
    got = load(folder, cfg, device_map, offload_folder=tmp_path / "fastq")
    assert got.hf_device_map == device_map
    assert {"model.embed_tokens.weight.dat", "lm_head.weight.dat", "index.json"} <= set(
        os.listdir(tmp_path / "fastq")
    )
    assert got.lm_head.weight.device.type == "meta"  # offloaded: read from disk by accelerate's hooks
    plain = reference(folder, "llama")
    assert module_types(got) == module_types(plain)
    assert torch.equal(outputs(got, "llama"), outputs(plain, "llama"))
    ref = reference(
        folder,
        "llama",
        bnb("nf4", llm_int8_enable_fp32_cpu_offload=True),
        device_map=device_map,
        offload_folder=tmp_path / "transformers",
    )
    assert module_types(got) == module_types(ref)
    assert torch.equal(outputs(got, "llama"), outputs(ref, "llama"))


def test_disk_in_the_map_without_fp32_offload_is_refused_like_transformers(tiny_model, tmp_path):
    folder = tiny_model("llama")
    device_map = {**dict.fromkeys(LLAMA_MODULES, "cpu"), "lm_head": "disk"}
    with pytest.raises(ValueError, match="llm_int8_enable_fp32_cpu_offload"):
        reference(folder, "llama", bnb("nf4"), device_map=device_map, offload_folder=tmp_path / "t")
    with pytest.raises(fastq.ConfigError, match="llm_int8_enable_fp32_cpu_offload"):
        load(folder, bnb("nf4"), device_map, offload_folder=tmp_path / "f")


def test_device_map_naming_an_unknown_module(tiny_model):
    with pytest.raises(fastq.ConfigError, match="model.no_such_module"):
        load(tiny_model("llama"), bnb("nf4"), {"": "cpu", "model.no_such_module": "cpu"})


def test_device_map_that_misses_parameters(tiny_model):
    """transformers 5.24 accepts this map silently; fastq names what it leaves out (model.norm, lm_head and
    the rotary tables) instead of loading a model with parameters nowhere."""
    with pytest.raises(
        fastq.ConfigError,
        match=r"does not place \d+ parameter\(s\), e\.g\. '(model\.norm|model\.rotary_emb|lm_head)\.",
    ):
        load(tiny_model("llama"), bnb("nf4"), {"model.embed_tokens": "cpu", "model.layers": "cpu"})


def test_check_offload_quantized_modules_on_cpu_beside_a_gpu():
    """Without a GPU a mixed map cannot be loaded; check the rule itself."""
    quantized = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    mixed = {
        "model.embed_tokens": "cuda:0",
        "model.layers.0": "cuda:0",
        "model.layers.1": "cpu",
        "lm_head": "disk",
    }
    with pytest.raises(fastq.ConfigError, match=r"model\.layers\.1\.mlp\.down_proj"):
        check_offload(mixed, quantized, fp32_cpu_offload=False)
    check_offload(mixed, quantized, fp32_cpu_offload=True)
    check_offload({"": "cpu"}, quantized, fp32_cpu_offload=False)  # all on the CPU: bitsandbytes' CPU backend
    check_offload({"": "cuda:0"}, quantized, fp32_cpu_offload=False)
    check_offload(
        {"model.layers": "cuda:0", "lm_head": "cpu"}, quantized, fp32_cpu_offload=False
    )  # lm_head unquantized


# -- broken checkpoints ----------------------------------------------------------------------------------


def _copy(folder: str, tmp_path) -> str:
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return os.fspath(dst)


def test_truncated_shard(tiny_model, tmp_path):
    folder = _copy(tiny_model("llama"), tmp_path)
    path = os.path.join(folder, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 1000)
    with pytest.raises(fastq.TruncatedShardError) as info:
        load(folder, bnb("nf4"))
    err = info.value
    assert isinstance(err, fastq.FastqError)
    assert err.path == path and err.tensor, "the error names the file and the tensor"
    assert path in str(err) and err.tensor in str(err)


def test_missing_shard_listed_in_the_index(tmp_path):
    from conftest import build_tiny

    folder = tmp_path / "sharded"
    build_tiny("llama").save_pretrained(folder, max_shard_size="200KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(set(index.values()))[1]
    os.remove(folder / shard)
    with pytest.raises(fastq.MissingFileError) as info:
        load(os.fspath(folder), bnb("nf4"))
    err = info.value
    assert isinstance(err, FileNotFoundError) and isinstance(err, fastq.FastqError)
    assert shard in str(err) and err.tensor in [k for k, v in index.items() if v == shard]
    assert err.path and err.path in str(err)


def _edit_config(folder: str, **changes) -> None:
    path = Path(folder, "config.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_config_with_more_layers_than_the_weights(tiny_model, tmp_path):
    folder = _copy(tiny_model("llama"), tmp_path)
    _edit_config(folder, num_hidden_layers=3)
    with pytest.raises(
        fastq.FastqError, match=r"no tensor for 9 parameter\(s\).*model\.layers\.2\.self_attn\.q_proj"
    ):
        load(folder, bnb("nf4"))


def test_config_with_other_sizes_than_the_weights(tiny_model, tmp_path):
    folder = _copy(tiny_model("llama"), tmp_path)
    _edit_config(folder, intermediate_size=512)
    with pytest.raises(fastq.ShapeError) as info:
        load(folder, bnb("nf4"))
    err = info.value
    assert err.path == os.path.join(folder, "model.safetensors")
    assert err.tensor == "model.layers.0.mlp.gate_proj.weight" and "[384, 128]" in str(err)


def test_sizes_are_checked_for_prequantized_checkpoints_too(prequantized, tmp_path):
    folder = _copy(prequantized("llama", "nf4"), tmp_path)
    _edit_config(folder, intermediate_size=512)
    with pytest.raises(fastq.ShapeError, match="gate_proj"):
        fastq.load(folder, progress=False)
