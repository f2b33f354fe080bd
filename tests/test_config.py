"""QuantConfig against transformers' BitsAndBytesConfig and accelerate's BnbQuantizationConfig."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
from accelerate.utils import BnbQuantizationConfig
from fastq.checkpoint import Spec4bit
from fastq.config import QuantConfig
from fastq.errors import ConfigError
from transformers import BitsAndBytesConfig

FIELDS = {f.name for f in dataclasses.fields(QuantConfig)}
BNB_FIELDS = [
    "load_in_8bit",
    "load_in_4bit",
    "llm_int8_threshold",
    "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_quant_storage",
]

CONFIGS = {
    "nf4-double-bf16": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.bfloat16,
    },
    "fp4-defaults": {"load_in_4bit": True},
    "nf4-bf16-storage": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_quant_storage": "bfloat16",
    },
    "int8-skip": {"load_in_8bit": True, "llm_int8_skip_modules": ["lm_head", "classifier"]},
    "int8-offload": {
        "load_in_8bit": True,
        "llm_int8_enable_fp32_cpu_offload": True,
        "llm_int8_threshold": 4.5,
    },
    "int8-fp16-weight": {"load_in_8bit": True, "llm_int8_has_fp16_weight": True, "llm_int8_skip_modules": []},
}


# -- defaults and fields -------------------------------------------------------------------------


def test_every_transformers_argument_is_a_field_with_the_same_default():
    params = inspect.signature(BitsAndBytesConfig.__init__).parameters
    names = [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD]
    assert sorted(names) == sorted(BNB_FIELDS), "transformers changed BitsAndBytesConfig's arguments"
    ours = {f.name: f.default for f in dataclasses.fields(QuantConfig)}
    for name in names:
        assert ours[name] == params[name].default, name


@pytest.mark.parametrize("mode", ["load_in_4bit", "load_in_8bit"])
def test_resolved_defaults_equal_transformers(mode):
    ours, theirs = QuantConfig(**{mode: True}), BitsAndBytesConfig(**{mode: True})
    for name in BNB_FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.blocksize == 64 and ours.torch_dtype is None
    assert ours.skip_modules is None and ours.keep_in_fp32_modules is None


def test_every_accelerate_field_is_a_field():
    assert {f.name for f in dataclasses.fields(BnbQuantizationConfig)} <= FIELDS


# -- to_dict -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=CONFIGS.keys())
def test_to_dict_equals_transformers(kwargs):
    ours = QuantConfig(**kwargs).to_dict()
    theirs = BitsAndBytesConfig(**kwargs).to_dict()
    assert ours == theirs
    assert list(ours) == list(theirs)  # same key order, so config.json diffs stay small
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)
    assert type(ours["quant_method"]) is str


@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=CONFIGS.keys())
def test_dict_round_trip(kwargs):
    d = BitsAndBytesConfig(**kwargs).to_dict()
    d = json.loads(json.dumps(d))  # as read back from config.json
    cfg = QuantConfig.from_dict(d)
    assert cfg == QuantConfig(**kwargs)
    assert cfg.to_dict() == d


def test_fastq_fields_go_to_a_sub_dict_only_when_not_default():
    cfg = QuantConfig(load_in_4bit=True, blocksize=128, torch_dtype="bfloat16", keep_in_fp32_modules=["wo"])
    d = cfg.to_dict()
    assert d["fastq"] == {"blocksize": 128, "torch_dtype": "bfloat16", "keep_in_fp32_modules": ["wo"]}
    assert QuantConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert "fastq" not in QuantConfig(load_in_4bit=True, blocksize=64).to_dict()


def test_skip_modules_fold_into_the_transformers_list_and_round_trip():
    cfg = QuantConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"], skip_modules=["score", "lm_head"])
    d = cfg.to_dict()
    assert d["llm_int8_skip_modules"] == ["lm_head", "score"]
    assert d["fastq"] == {"skip_modules": ["score", "lm_head"], "llm_int8_skip_modules": ["lm_head"]}
    assert QuantConfig.from_dict(d) == cfg


def test_transformers_reads_our_dict():
    from transformers.quantizers.auto import AutoQuantizationConfig

    cfg = QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", blocksize=256, skip_modules=["head"])
    d = cfg.to_dict()
    theirs = AutoQuantizationConfig.from_dict(d)  # the "fastq" key is an unused kwarg to transformers
    assert theirs.to_dict() == {k: v for k, v in d.items() if k != "fastq"}
    assert theirs.llm_int8_skip_modules == ["head"]


def test_from_dict_reads_private_keys_and_ignores_unknown_ones():
    d = {"quant_method": "bitsandbytes", "_load_in_4bit": True, "_load_in_8bit": False, "new_field": 1}
    assert QuantConfig.from_dict(d) == QuantConfig(load_in_4bit=True)
    assert QuantConfig.from_dict({"load_in_8bit": True}).is_8bit  # quant_method may be missing
    raw = BitsAndBytesConfig(load_in_4bit=True).to_dict()  # quant_method is transformers' enum here
    assert QuantConfig.from_dict(raw) == QuantConfig(load_in_4bit=True)


# -- coerce and conversions ----------------------------------------------------------------------


def test_coerce_none_and_self():
    cfg = QuantConfig(load_in_4bit=True)
    assert QuantConfig.coerce(None) is None
    assert QuantConfig.coerce(cfg) is cfg


@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=CONFIGS.keys())
def test_coerce_and_to_bnb_config(kwargs):
    cfg = QuantConfig.coerce(BitsAndBytesConfig(**kwargs))
    assert cfg == QuantConfig(**kwargs)
    back = cfg.to_bnb_config()
    assert isinstance(back, BitsAndBytesConfig)
    assert back.to_dict() == BitsAndBytesConfig(**kwargs).to_dict()
    assert QuantConfig.coerce(cfg.to_dict()) == cfg


def test_coerce_accelerate_keeps_its_values():
    acc = BnbQuantizationConfig(load_in_4bit=True)  # accelerate's defaults: fp4, float16 compute
    cfg = QuantConfig.coerce(acc)
    assert cfg.bnb_4bit_quant_type == "fp4" and not cfg.bnb_4bit_use_double_quant
    assert cfg.compute_dtype == torch.float16 != QuantConfig(load_in_4bit=True).compute_dtype
    assert cfg.torch_dtype == torch.float16  # accelerate fills it in from the compute dtype
    acc = BnbQuantizationConfig(
        load_in_8bit=True, llm_int8_threshold=5, skip_modules=["lm_head"], keep_in_fp32_modules=["wo"]
    )
    cfg = QuantConfig.coerce(acc)
    assert (cfg.is_8bit, cfg.llm_int8_threshold, cfg.torch_dtype) == (True, 5.0, torch.float16)
    assert cfg.skip_modules == ["lm_head"] and cfg.keep_in_fp32_modules == ["wo"]
    assert cfg.llm_int8_skip_modules is None
    acc.skip_modules.append("x")  # accelerate extends its lists while loading; we hold copies
    assert cfg.skip_modules == ["lm_head"]


def test_to_accelerate_config():
    cfg = QuantConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype="bf16",
        llm_int8_threshold=3.0,  # accelerate warns on this for 4-bit; pytest turns warnings into errors
        llm_int8_skip_modules=["a"],
        skip_modules=["b"],
    )
    acc = cfg.to_accelerate_config()
    assert isinstance(acc, BnbQuantizationConfig)
    assert acc.bnb_4bit_compute_dtype == torch.bfloat16 and acc.torch_dtype == torch.bfloat16
    assert acc.skip_modules == ["a", "b"]
    assert QuantConfig.coerce(acc).modules_to_not_convert == ["a", "b"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"}, "bnb_4bit_quant_storage"),
        ({"load_in_4bit": True, "blocksize": 128}, "blocksize"),
        ({"load_in_8bit": True, "llm_int8_has_fp16_weight": True}, "llm_int8_has_fp16_weight"),
    ],
)
def test_to_accelerate_config_refuses_what_it_cannot_express(kwargs, field):
    with pytest.raises(ConfigError, match=f"cannot express {field}.*to_bnb_config"):
        QuantConfig(**kwargs).to_accelerate_config()


def test_to_accelerate_config_ignores_fields_that_do_not_apply():
    cfg = QuantConfig(load_in_8bit=True, blocksize=128, bnb_4bit_quant_storage="float16")
    assert cfg.to_accelerate_config().load_in_8bit


# -- validation ----------------------------------------------------------------------------------

BAD = [
    ({"load_in_4bit": True, "load_in_8bit": True}, "both True; set only one"),
    ({}, "neither load_in_4bit nor load_in_8bit.*pass None"),
    ({"load_in_4bit": 1}, "load_in_4bit must be True or False"),
    ({"load_in_4bit": True, "bnb_4bit_use_double_quant": "yes"}, "bnb_4bit_use_double_quant must be True"),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "NF4"}, "'NF4' is unknown; use 'nf4' or 'fp4'"),
    ({"load_in_8bit": True, "bnb_4bit_quant_type": "int4"}, "'int4' is unknown"),  # checked in 8-bit too
    (
        {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat17"},
        "not a dtype; pass a torch.dtype or one of",
    ),
    ({"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.int8}, "not supported; use one of 'float16'"),
    ({"load_in_4bit": True, "bnb_4bit_compute_dtype": 16}, "not a dtype"),
    ({"load_in_4bit": True, "bnb_4bit_quant_storage": "int32"}, "not supported; use one of 'uint8', 'int8'"),
    ({"load_in_4bit": True, "torch_dtype": "float64"}, "torch_dtype='float64' is not supported"),
    ({"load_in_8bit": True, "llm_int8_threshold": -1.0}, "finite number >= 0"),
    ({"load_in_8bit": True, "llm_int8_threshold": float("nan")}, "finite number >= 0"),
    ({"load_in_8bit": True, "llm_int8_threshold": "6"}, "finite number >= 0"),
    ({"load_in_8bit": True, "llm_int8_threshold": True}, "finite number >= 0"),
    ({"load_in_8bit": True, "llm_int8_skip_modules": "lm_head"}, r"not a string; write \['lm_head'\]"),
    ({"load_in_8bit": True, "skip_modules": ["lm_head", 3]}, "skip_modules must be a list of module names"),
    ({"load_in_4bit": True, "keep_in_fp32_modules": {"wo"}}, "keep_in_fp32_modules must be a list"),
    ({"load_in_4bit": True, "blocksize": 48}, "blocksize=48 .*power of two from 32 to 4096"),
    ({"load_in_4bit": True, "blocksize": 8192}, "blocksize=8192"),
    ({"load_in_4bit": True, "blocksize": 64.0}, "blocksize=64.0"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[m[:30] for _, m in BAD])
def test_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**kwargs)


@pytest.mark.parametrize(
    "d, message",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method is 'gptq'; fastq reads only 'bitsandbytes'"),
        ({"load_in_4bit": True, "_load_in_4bit": False}, "_load_in_4bit=False; make them agree"),
        ({"load_in_4bit": True, "fastq": [1]}, "'fastq' entry must be a dict"),
        ({"quant_method": "bitsandbytes"}, "neither load_in_4bit nor load_in_8bit"),
    ],
)
def test_from_dict_validation(d, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig.from_dict(d)


def test_coerce_rejects_other_types():
    with pytest.raises(ConfigError, match="cannot make a QuantConfig from str; pass a QuantConfig"):
        QuantConfig.coerce("nf4")


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        QuantConfig()


# -- dtypes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [torch.bfloat16, "bfloat16", "torch.bfloat16", "bf16", " BFloat16 ", "TORCH.BFLOAT16"]
)
def test_dtype_spellings(value):
    cfg = QuantConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=value, bnb_4bit_quant_storage=value, torch_dtype=value
    )
    assert cfg.compute_dtype == cfg.quant_storage == cfg.torch_dtype == torch.bfloat16
    assert cfg.to_dict()["bnb_4bit_compute_dtype"] == "bfloat16"


@pytest.mark.parametrize("name", ["float16", "float32", "int8", "uint8", "float64", "bfloat16"])
def test_quant_storage_accepts_what_transformers_accepts(name):
    ours = QuantConfig(load_in_4bit=True, bnb_4bit_quant_storage=name)
    assert (
        ours.quant_storage
        == BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=name).bnb_4bit_quant_storage
    )


@pytest.mark.parametrize(
    "value, dtype", [("fp16", torch.float16), ("half", torch.float16), ("fp32", torch.float32)]
)
def test_dtype_aliases(value, dtype):
    assert QuantConfig(load_in_4bit=True, bnb_4bit_compute_dtype=value).compute_dtype == dtype


# -- views, equality -----------------------------------------------------------------------------


def test_properties():
    c4 = QuantConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, blocksize=128
    )
    assert (c4.is_4bit, c4.is_8bit, c4.quant_method, c4.quantization_method()) == (
        True,
        False,
        "bitsandbytes",
        "nf4",
    )
    assert c4.spec == Spec4bit(quant_type="nf4", blocksize=128, double_quant=True, quant_storage=torch.uint8)
    assert c4.compute_dtype == torch.float32 and c4.quant_storage == torch.uint8
    c8 = QuantConfig(load_in_8bit=True)
    assert (c8.is_8bit, c8.spec, c8.quantization_method()) == (True, "int8", "llm_int8")


def test_modules_to_not_convert():
    cfg = QuantConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=["lm_head", "a"],
        skip_modules=["b", "lm_head"],
        keep_in_fp32_modules=["a", "wo"],
    )
    assert cfg.modules_to_not_convert == ["lm_head", "a", "b", "wo"]
    assert not cfg.default_skips
    assert QuantConfig(load_in_4bit=True).modules_to_not_convert == []
    assert QuantConfig(load_in_4bit=True, keep_in_fp32_modules=["wo"]).default_skips
    assert not QuantConfig(load_in_4bit=True, llm_int8_skip_modules=[]).default_skips  # [] drops lm_head skip


def test_equality_hash_repr_and_immutability():
    a = QuantConfig(load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16", llm_int8_skip_modules=("x",))
    b = QuantConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["x"])
    assert a == b and hash(a) == hash(b) and a != QuantConfig(load_in_4bit=True)
    assert a != BitsAndBytesConfig(load_in_4bit=True)
    assert (
        repr(a)
        == "QuantConfig(load_in_4bit=True, llm_int8_skip_modules=['x'], bnb_4bit_compute_dtype=torch.bfloat16)"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.blocksize = 128
    assert dataclasses.replace(a, blocksize=128).blocksize == 128
    with pytest.raises(ConfigError, match="blocksize=100"):
        dataclasses.replace(a, blocksize=100)
    with pytest.raises(TypeError):
        QuantConfig(True)  # keyword-only: transformers and accelerate order their fields differently


# -- the block size: transformers' loader reads it from the checkpoint ------------------------------


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_prequantized_loader_honors_the_saved_blocksize(blocksize):
    """transformers loads 4-bit weights through Params4bit.from_prequantized, which takes the block size
    from the quant_state JSON, not from BitsAndBytesConfig (which has none)."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = torch.randn(16, 256)
    packed, state = quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    p = bnb.nn.Params4bit.from_prequantized(packed, state.as_dict(packed=True), device="cpu")
    assert p.blocksize == p.quant_state.blocksize == blocksize
    assert torch.equal(dequantize_4bit(p, p.quant_state), dequantize_4bit(packed, state))
