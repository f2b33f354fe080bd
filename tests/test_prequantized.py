"""A pre-quantized checkpoint whose statistics lie is refused at load, naming the file and the tensor:
bitsandbytes would load it into a wrong model (an SCB relabelled I32, a nested absmax cut short) or fail
on the first forward inside a kernel (short absmax, short packed weight, blocksize 0)."""

from __future__ import annotations

import json
import os
import shutil

import fastq
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

W = "model.layers.0.mlp.down_proj.weight"
M = W.removesuffix(".weight")


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory):
    """``converted(name) -> folder``: the tiny llama converted by fastq (the checkpoint transformers
    writes for the same model, tests/test_convert.py) with 4-bit, 4-bit + double quant, or int8."""
    cfgs = {
        "nf4": fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        "nf4-dq": fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
        "int8": fastq.QuantConfig(load_in_8bit=True),
    }
    cache: dict[str, str] = {}

    def make(name: str) -> str:
        if name not in cache:
            dst = tmp_path_factory.mktemp(f"conv-{name}") / "out"
            fastq.convert(tiny_model("llama"), dst, cfgs[name], progress=False)
            cache[name] = os.fspath(dst)
        return cache[name]

    return make


def _edit(folder: str, tmp_path, change) -> tuple[str, str]:
    """A copy of ``folder`` whose shard holding ``W`` went through ``change(tensors)``; returns the copy
    and that shard's path."""
    dst = tmp_path / "bad"
    shutil.copytree(folder, dst)
    shard = next(
        os.path.join(dst, f) for f in sorted(os.listdir(dst))
        if f.endswith(".safetensors") and W in load_file(os.path.join(dst, f))
    )
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return os.fspath(dst), shard


def _quant_state_key(tensors) -> str:
    return next(k for k in tensors if k.startswith(W + ".quant_state."))


def _set_json(tensors, **fields):
    key = _quant_state_key(tensors)
    qs = json.loads(bytes(tensors[key].numpy()).decode())
    qs.update(fields)
    tensors[key] = torch.tensor(np.frombuffer(json.dumps(qs).encode(), dtype=np.uint8).copy())


CASES = {
    "scb relabelled I32": ("int8", lambda t: t.__setitem__(f"{M}.SCB", t[f"{M}.SCB"].view(torch.int32)),
                           f"{M}.SCB", r"SCB must be \d+ x F32"),
    "scb short": ("int8", lambda t: t.__setitem__(f"{M}.SCB", t[f"{M}.SCB"][:-1].clone()), f"{M}.SCB", "SCB must be"),
    "nested absmax cut short": ("nf4-dq", lambda t: t.__setitem__(f"{W}.nested_absmax", t[f"{W}.nested_absmax"][:0].clone()),
                                f"{W}.nested_absmax", "nested_absmax must be"),
    "absmax short": ("nf4", lambda t: t.__setitem__(f"{W}.absmax", t[f"{W}.absmax"][:-1].clone()), f"{W}.absmax", "absmax must be"),
    "absmax long": ("nf4", lambda t: t.__setitem__(f"{W}.absmax", torch.cat([t[f"{W}.absmax"]] * 2)), f"{W}.absmax", "absmax must be"),
    "packed weight short": ("nf4", lambda t: t.__setitem__(W, t[W][:-1].clone()), W, "packed bytes"),
    "blocksize 0": ("nf4", lambda t: _set_json(t, blocksize=0), "quant_state", "'blocksize' is 0"),
    "blocksize 32 for 64-blocks": ("nf4", lambda t: _set_json(t, blocksize=32), f"{W}.absmax", "absmax must be"),
    "shape lies": ("nf4", lambda t: _set_json(t, shape=[7, 7]), W, "packed bytes"),
    "quant_type lies": ("nf4", lambda t: _set_json(t, quant_type="fp4"), "quant_state", "'quant_type'"),
    "garbage quant_state": ("nf4", lambda t: t.__setitem__(_quant_state_key(t), torch.tensor([0xFF, 0xFE, 0x00], dtype=torch.uint8)),
                            "quant_state", "not JSON"),
    "quant_state not an object": ("nf4", lambda t: t.__setitem__(_quant_state_key(t), torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)),
                                  "quant_state", "not a JSON object"),
    "missing quant_map": ("nf4", lambda t: t.pop(f"{W}.quant_map"), W, "no quant_map"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lying_statistics_are_refused_naming_file_and_tensor(converted, tmp_path, case):
    name, change, tensor, message = CASES[case]
    folder, shard = _edit(converted(name), tmp_path, change)
    with pytest.raises(fastq.QuantStateError, match=message) as info:
        fastq.load(folder, device_map="cpu", progress=False)
    err = info.value
    assert isinstance(err, fastq.HeaderError)
    assert err.path == shard and shard in str(err)
    assert err.tensor == (_quant_state_key(load_file(shard)) if tensor == "quant_state" else tensor)


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "int8"])
def test_honest_checkpoints_pass_the_checks(converted, name):
    model = fastq.load(converted(name), device_map="cpu", progress=False)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()
