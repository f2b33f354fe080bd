"""``fastq inspect``'s estimates from the headers (fastq/estimate.py) against the exact ones, which build
the model with transformers and bitsandbytes and plan it as ``convert`` does (``inspect.estimate_bytes``):
equal to the byte for NF4, NF4 + double quant and LLM.int8, on the tiny families of conftest.py and the
architectures of test_architectures.py, saved the way those tests save them; the family table against
transformers' own classes; and the exact path taken, and said, where the rule does not reach."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import FAMILIES as TINY
from fastq import _fastq
from fastq.config import QuantConfig
from fastq.estimate import FAMILIES, estimate_from_headers, uncovered
from fastq.inspect import ESTIMATES, _fast_estimate, estimate_bytes, inspect_checkpoint
from test_architectures import MATRIX, matrix_model, save_family

#: test_architectures.py's families the rule covers (the MoE ones take the exact path, checked below).
MATRIX_COVERED = [f for f in MATRIX if MATRIX[f][2].get("num_experts") is None and "moe" not in f]


def _save_matrix(tmp_path_factory, family: str) -> str:
    """A tiny ``family`` of test_architectures.MATRIX, built and saved as test_family_matrix does."""
    model = matrix_model(family)
    folder = tmp_path_factory.mktemp(family)
    model.to(torch.bfloat16).save_pretrained(folder)
    return str(folder)


def assert_estimates_equal(folder: str) -> None:
    config = json.loads((Path(folder) / "config.json").read_text())
    names = [t[0] for t in _fastq.Checkpoint(folder).tensors()]
    assert uncovered(config, names) is None
    for label, fields in ESTIMATES.items():
        assert _fast_estimate(folder, config, fields) == estimate_bytes(folder, QuantConfig(**fields)), label
    report = inspect_checkpoint(folder)
    assert report["estimate"] == "from headers" and report["estimate_note"] is None


@pytest.mark.parametrize("family", list(TINY))
def test_tiny_families(tiny_model, family):
    assert_estimates_equal(tiny_model(family))


@pytest.mark.parametrize("family", ["gpt_neox", *MATRIX_COVERED])
def test_architectures(tmp_path_factory, family):
    folder = save_family(tmp_path_factory, family) if family == "gpt_neox" else _save_matrix(tmp_path_factory, family)
    assert_estimates_equal(folder)


def test_float32_weights(tiny_model):
    assert_estimates_equal(tiny_model("llama", torch.float32))


def test_cast_to_the_config_dtype_and_keep_in_fp32(tiny_model, tmp_path):
    """bfloat16 weights under a float16 config: every tensor is cast, T5's ``wo`` kept in float32."""
    folder = tmp_path / "t5"
    shutil.copytree(tiny_model("t5"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(config))
    assert_estimates_equal(str(folder))
    fp16 = estimate_from_headers(folder, config, quant_type="nf4")
    assert fp16 != estimate_from_headers(folder, {**config, "dtype": "bfloat16"}, quant_type="nf4")


def test_fp4_and_bitsandbytes_defaults(tiny_model):
    folder = tiny_model("gpt2")
    config = json.loads((Path(folder) / "config.json").read_text())
    fields = {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    assert _fast_estimate(folder, config, fields) == estimate_bytes(folder, QuantConfig(**fields))


def test_moe_takes_the_exact_path_and_says_so(tmp_path_factory):
    folder = save_family(tmp_path_factory, "mixtral")
    report = inspect_checkpoint(folder)
    assert report["estimate"] == "exact" and "mixtral" in report["estimate_note"]
    for label, fields in ESTIMATES.items():
        assert report["memory"][label] == estimate_bytes(folder, QuantConfig(**fields))


def test_exact_on_request(tiny_model):
    report = inspect_checkpoint(tiny_model("llama"), exact=True)
    assert report["estimate"] == "exact"
    assert report["memory"] == inspect_checkpoint(tiny_model("llama"))["memory"]


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_table_matches_transformers(model_type):
    """The defaults and class attributes FAMILIES writes down are transformers' own."""
    family = FAMILIES[model_type]
    assert transformers.AutoConfig.for_model(model_type).tie_word_embeddings == family.tie_word_embeddings
    for arch in family.architectures:
        cls = getattr(transformers, arch)
        assert cls.config_class.model_type == model_type
        assert sorted(cls._keep_in_fp32_modules or []) == sorted(family.keep_in_fp32), arch
        assert not cls._keep_in_fp32_modules_strict, arch  # the rule has no place for them
