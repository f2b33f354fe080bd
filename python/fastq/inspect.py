"""``fastq inspect`` as a library: what a checkpoint holds (tensors, dtypes, shards, quantization), the
memory a 4-bit or 8-bit load of it would take, and whether its shards still match the manifest
``fastq convert`` wrote. cli.py parses the arguments and prints the report.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from . import _fastq
from .bnb_format import SCB, quant_state_type
from .errors import HeaderError
from .estimate import estimate_from_headers, uncovered
from .source import QUANT_METHOD, Source, quant_method, quantization_method, saved_quantization

__all__ = ["ESTIMATES", "estimate_bytes", "inspect_checkpoint", "shard_digest", "verify_shards"]

# Only the exact estimates build the model (torch, transformers, bitsandbytes): the report reads headers
# and JSON, and estimates from them where estimate.py's rule covers the checkpoint, so ``fastq inspect``
# of a covered family (or with --no-estimate, or of a quantized checkpoint) imports none of them.

#: The loads ``inspect`` estimates: report label -> BitsAndBytesConfig fields.
ESTIMATES: dict[str, dict] = {
    "4-bit nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "4-bit nf4, double quant": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "8-bit": {"load_in_8bit": True},
}


def estimate_bytes(path: Path, cfg) -> int:
    """Bytes of every tensor a load with ``cfg`` holds (what ``convert`` would write), exactly: the empty
    model is built and planned as ``convert`` plans it (torch, transformers and bitsandbytes imported)."""
    from .convert import plan_outputs
    from .loader import prepare

    prepared = prepare(path, cfg)
    out = plan_outputs(prepared)
    layout = _fastq.plan_layout(prepared.ckpt.path, out.jobs, out.outputs, 1 << 62)
    return sum(size for _, tensors in layout for _, _, _, size, _ in tensors)


def _fast_estimate(folder: Path, config: dict, fields: dict) -> int:
    """``estimate_from_headers`` of the load that BitsAndBytesConfig ``fields`` describe."""
    return estimate_from_headers(
        folder, config, load_in_8bit=fields.get("load_in_8bit", False),
        quant_type=fields.get("bnb_4bit_quant_type", "fp4"),
        double_quant=fields.get("bnb_4bit_use_double_quant", False),
    )


def inspect_checkpoint(
    path: str | os.PathLike, *, estimate: bool = True, exact: bool = False, verify: bool = False
) -> dict:
    """What ``fastq inspect`` reports, as a dict.

    Args:
        path: a checkpoint folder (config.json + safetensors) or one safetensors file.
        estimate: compute the memory a 4-bit and an 8-bit load would take: from the headers and
            config.json where fastq.estimate's rule covers the checkpoint, else by building the empty model.
        exact: always build the empty model for the estimates (torch, transformers, bitsandbytes; seconds).
        verify: check every shard against ``fastq-manifest.json``.

    Returns:
        ``tensors``, ``total_bytes``, ``dtypes`` ({dtype: {"tensors", "bytes"}}), ``shards``,
        ``quantization`` (None or a description: ``quant_method``, ``method`` - "nf4", "fp4",
        "llm_int8", None for another library's -, ``config``, ``4bit_weights``, ``int8_weights``),
        ``memory`` ({"as stored", "4-bit nf4", ...}), with estimates ``estimate`` ("from headers" or
        "exact") and ``estimate_note`` (why the exact path was taken, None when it was not), and
        ``manifest`` where one exists.
    """
    p = Path(path)
    src = Source(p)
    ckpt = _fastq.Checkpoint(os.fspath(p))
    metas = ckpt.tensors()  # (name, dtype, shape, file, nbytes), shard by shard in file order
    by_dtype: dict[str, dict] = {}
    for _, dtype, _, _, nbytes in metas:
        d = by_dtype.setdefault(dtype, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += nbytes
    config = src.raw_config()
    keys = [m[0] for m in metas]
    packed = Counter(t for t in map(quant_state_type, keys) if t is not None)
    scb = sum(1 for k in keys if k.endswith("." + SCB))
    quant = None
    qc = saved_quantization(config, src.config_path)
    if qc or packed or scb:
        method = quant_method(qc) if qc else QUANT_METHOD
        quant = {
            "config": qc,
            "4bit_weights": dict(packed),
            "int8_weights": scb,
            "quant_method": method,
            "method": quantization_method(qc) if qc and method == QUANT_METHOD else None,
        }
    total = sum(m[4] for m in metas)
    report = {
        "path": os.fspath(p),
        "architectures": config.get("architectures"),
        "tensors": len(metas),
        "total_bytes": total,
        "shards": len(ckpt.shard_paths()),
        "dtypes": by_dtype,
        "quantization": quant,
        "memory": {"as stored": total},
    }
    if estimate and config and quant is None:
        folder = src.folder
        note = "asked for (exact=True)" if exact else uncovered(config, keys)
        if note is None:
            for label, fields in ESTIMATES.items():
                report["memory"][label] = _fast_estimate(folder, config, fields)
        else:
            from .config import QuantConfig

            for label, fields in ESTIMATES.items():
                report["memory"][label] = estimate_bytes(folder, QuantConfig(**fields))
        report["estimate"] = "from headers" if note is None else "exact"
        report["estimate_note"] = note
    manifest = src.folder / "fastq-manifest.json"
    if manifest.is_file():
        m = _read_manifest(manifest)
        report["manifest"] = {"shards": len(m.get("shards", {})), "fastq_version": m.get("fastq_version")}
        if verify:
            report["manifest"]["verified"] = verify_shards(src.folder, m)
    return report


def _read_manifest(path: Path) -> dict:
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        m = None
    if not isinstance(m, dict) or not isinstance(m.get("shards", {}), dict):
        raise HeaderError(f"{path}: not the manifest fastq convert writes (a JSON object with \"shards\")", path=path)
    return m


def shard_digest(path: Path) -> str:
    """The manifest's checksum of a file: SHA-256 of the SHA-256 digests of its 16 MiB chunks."""
    outer = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            outer.update(hashlib.sha256(chunk).digest())
    return outer.hexdigest()


def verify_shards(folder: Path, manifest: dict) -> dict[str, bool]:
    """Whether each shard the manifest records is on disk with its recorded size and checksum."""
    out = {}
    for name, rec in manifest.get("shards", {}).items():
        f = folder / name
        out[name] = f.is_file() and f.stat().st_size == rec["size"] and shard_digest(f) == rec["digest"]
    return out
