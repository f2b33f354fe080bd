"""The code tables committed in rust/core/quant/tables.rs against what bitsandbytes computes, bit for bit.

scripts/gen_tables.py regenerates the file; these tests fail when an upgrade of bitsandbytes changes a
table or when someone edits the generated file by hand.
"""

from __future__ import annotations

import pathlib
import re

import bitsandbytes
import bitsandbytes.functional as F
import pytest
import torch
from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds
from fastq import _fastq

TABLES = pathlib.Path(__file__).resolve().parents[1] / "rust" / "core" / "quant" / "tables.rs"
CPU = torch.device("cpu")


def f32_bits(values) -> list[int]:
    """The IEEE bit pattern of each value as float32 (so -0.0 and 0.0 differ)."""
    t = torch.as_tensor(values, dtype=torch.float32).contiguous()
    return [v & 0xFFFFFFFF for v in t.view(torch.int32).tolist()]


def committed() -> dict[str, list[int]]:
    """Every ``pub const NAME: [T; N] = [...]`` of tables.rs, as integers."""
    text = TABLES.read_text()
    consts = {}
    for m in re.finditer(r"pub const (\w+): \[(u32|u8); (\d+)\] = \[([^\]]*)\];", text):
        name, _, n, body = m.groups()
        items = [int(v, 0) for v in re.split(r"[,\s]+", body) if v]
        assert len(items) == int(n), name
        consts[name] = items
    return consts


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_4bit_binding_equals_bnb(quant_type):
    ours = _fastq.code_4bit(quant_type)
    assert len(ours) == 16
    assert f32_bits(ours) == f32_bits(F.get_4bit_type(quant_type, device=CPU))


def test_dynamic_map_binding_equals_bnb():
    ours = _fastq.dynamic_map()
    assert len(ours) == 256
    assert f32_bits(ours) == f32_bits(F.create_dynamic_map(signed=True))
    # The nested quantization searches it, so it must be sorted.
    assert ours == sorted(ours)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_committed_4bit_tables_equal_bnb(quant_type):
    consts = committed()
    up = quant_type.upper()
    bounds, order = _get_4bit_quantize_bounds(quant_type, CPU)
    assert consts[f"{up}_CODE_BITS"] == f32_bits(F.get_4bit_type(quant_type, device=CPU))
    assert consts[f"{up}_BOUND_BITS"] == f32_bits(bounds)
    assert consts[f"{up}_ORDER"] == order.tolist()


def test_committed_dynamic_map_equals_bnb():
    assert committed()["DYNAMIC_SIGNED_BITS"] == f32_bits(F.create_dynamic_map(signed=True))


def test_committed_tables_are_complete():
    """Nothing in tables.rs escapes the checks above."""
    assert set(committed()) == {
        "NF4_CODE_BITS",
        "NF4_BOUND_BITS",
        "NF4_ORDER",
        "FP4_CODE_BITS",
        "FP4_BOUND_BITS",
        "FP4_ORDER",
        "DYNAMIC_SIGNED_BITS",
    }


def test_bnb_version_matches_generated_header():
    """The tables say which bitsandbytes they came from; byte-for-byte tests assume that version."""
    m = re.search(r"bitsandbytes (\d+\.\d+\.\d+[\w.+-]*?)[;,.]?\s", TABLES.read_text())
    assert m, "tables.rs does not name the bitsandbytes version it was generated from"
    assert m.group(1) == bitsandbytes.__version__
