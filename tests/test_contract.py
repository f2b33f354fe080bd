"""The typed contract across the binding: jobs and results are frozen classes with named fields, the
writer's part names are bitsandbytes' state-dict names as fastq.bnb_format spells them, and no Python
module reaches into another's private names."""

import ast
from pathlib import Path

import fastq
import pytest
import torch
from fastq import _fastq, bnb_format

PKG = Path(fastq.__file__).parent


def test_writer_part_names_are_bnb_format_names():
    expected = ["weight", *bnb_format.QUANT_STATE_SUFFIXES, bnb_format.QUANT_STATE, bnb_format.SCB,
                bnb_format.WEIGHT_FORMAT]
    assert _fastq.part_names() == expected


def test_job_fields_round_trip_and_are_frozen():
    j = _fastq.Job.four_bit("a.weight", "fp4", 128, False, transpose=True, cast="F16", storage="BF16")
    assert (j.name, j.kind, j.quant_type, j.blocksize, j.double_quant, j.transpose, j.cast, j.storage) == (
        "a.weight", "4bit", "fp4", 128, False, True, "F16", "BF16")
    assert j == _fastq.Job.four_bit("a.weight", "fp4", 128, False, transpose=True, cast="F16", storage="BF16")
    assert j != _fastq.Job.four_bit("a.weight", "fp4", 128, True, transpose=True, cast="F16", storage="BF16")
    k = _fastq.Job.int8("b.weight")
    assert (k.kind, k.quant_type, k.blocksize, k.double_quant, k.transpose, k.cast) == (
        "int8", None, None, None, False, None)
    with pytest.raises(AttributeError):
        j.blocksize = 64
    assert "Job.four_bit('a.weight', quant_type='fp4', blocksize=128" in repr(j)


@pytest.mark.parametrize("double_quant", [False, True])
def test_packed4bit_fields_are_buffers(double_quant):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    r = _fastq.quantize_4bit(x.numpy().tobytes(), "F32", [4, 64], "nf4", 64, double_quant)
    assert isinstance(r, _fastq.Packed4bit)
    assert (r.quant_type, r.blocksize, r.shape, r.dtype) == ("nf4", 64, [4, 64], "F32")
    assert isinstance(r.codes, _fastq.Buffer) and len(r.codes) == 128
    if double_quant:
        assert r.absmax is None and len(r.nested_codes) == 4 and len(r.nested_absmax) == 4
        assert isinstance(r.offset, float)
    else:
        assert len(r.absmax) == 16 and r.nested_codes is None and r.nested_absmax is None and r.offset is None
    with pytest.raises(AttributeError):
        r.codes = None


def test_packed_int8_fields_are_buffers():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    r = _fastq.quantize_int8(x.numpy().tobytes(), "F32", [3, 8])
    assert isinstance(r, _fastq.PackedInt8) and r.shape == [3, 8]
    assert len(r.CB) == 24 and len(r.SCB) == 12
    # bitsandbytes takes the row absmax of the float16 weight (Int8Params._quantize)
    assert torch.frombuffer(r.SCB, dtype=torch.float32).tolist() == x.half().float().abs().amax(1).tolist()


def _imports_of_private_names(path: Path):
    tree = ast.parse(path.read_text())
    modules = {p.stem for p in PKG.glob("*.py")}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__") and a.name != "_fastq":
                    yield f"from .{node.module} import {a.name}"
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            yield f"{node.value.id}.{node.attr}"


def test_no_module_imports_another_modules_private_names():
    found = {p.name: list(_imports_of_private_names(p)) for p in PKG.glob("*.py")}
    assert {k: v for k, v in found.items() if v} == {}


def test_quantize_nested_is_the_whole_tensor_double_quant():
    """The FSDP share double-quantizes a gathered absmax with _fastq.quantize_nested: byte for byte the
    nested statistics of the whole tensor's quantize_4bit."""
    x = torch.randn(70_000, generator=torch.Generator().manual_seed(2))
    data = x.numpy().tobytes()
    plain = _fastq.quantize_4bit(data, "F32", [70_000], "nf4", 64, False)
    nested = _fastq.quantize_4bit(data, "F32", [70_000], "nf4", 64, True)
    codes, absmax2, offset = _fastq.quantize_nested(memoryview(plain.absmax).cast("B"))
    assert bytes(codes) == bytes(nested.nested_codes) and bytes(absmax2) == bytes(nested.nested_absmax)
    assert offset == nested.offset
    with pytest.raises(fastq.InvalidArgumentError):
        _fastq.quantize_nested(b"abc")
