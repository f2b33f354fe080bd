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
from .checkpoint import Checkpoint
from .config import QuantConfig
from .convert import plan_outputs
from .loader import prepare

__all__ = ["estimate_bytes", "inspect_checkpoint", "shard_digest", "verify_shards"]


def estimate_bytes(path: Path, cfg) -> int:
    """Bytes of every tensor a load with ``cfg`` holds (what ``convert`` would write)."""
    prepared = prepare(path, cfg)
    out = plan_outputs(prepared)
    layout = _fastq.plan_layout(prepared.ckpt.path, out.jobs, out.outputs, 1 << 62)
    return sum(size for _, tensors in layout for _, _, _, size, _ in tensors)


def inspect_checkpoint(path: str | os.PathLike, *, estimate: bool = True, verify: bool = False) -> dict:
    """What ``fastq inspect`` reports, as a dict.

    Args:
        path: a checkpoint folder (config.json + safetensors) or one safetensors file.
        estimate: compute the memory a 4-bit and an 8-bit load would take (builds the empty model).
        verify: check every shard against ``fastq-manifest.json``.

    Returns:
        ``tensors``, ``total_bytes``, ``dtypes`` ({dtype: {"tensors", "bytes"}}), ``shards``,
        ``quantization`` (None or a description), ``memory`` ({"as stored", "4-bit nf4", ...}), and
        ``manifest`` where one exists.
    """
    p = Path(path)
    ckpt = Checkpoint(p)
    folder = p if p.is_dir() else p.parent
    metas = [ckpt.meta(k) for k in ckpt.keys()]  # noqa: SIM118 - keys() keeps file order
    by_dtype: dict[str, dict] = {}
    for m in metas:
        d = by_dtype.setdefault(m.dtype, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += m.nbytes
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    keys = ckpt.keys()
    packed = Counter(t for t in map(quant_state_type, keys) if t is not None)
    scb = sum(1 for k in keys if k.endswith("." + SCB))
    quant = None
    qc = config.get("quantization_config")
    if qc or packed or scb:
        quant = {
            "config": qc,
            "4bit_weights": dict(packed),
            "int8_weights": scb,
            "method": (QuantConfig.coerce(qc).quantization_method() if qc and qc.get("quant_method", "bitsandbytes") == "bitsandbytes" else None),
        }
    report = {
        "path": os.fspath(p),
        "architectures": config.get("architectures"),
        "tensors": len(metas),
        "total_bytes": sum(m.nbytes for m in metas),
        "shards": len(ckpt.shard_paths),
        "dtypes": by_dtype,
        "quantization": quant,
        "memory": {"as stored": sum(m.nbytes for m in metas)},
    }
    if estimate and config and quant is None:
        report["memory"]["4-bit nf4"] = estimate_bytes(folder, QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
        report["memory"]["4-bit nf4, double quant"] = estimate_bytes(
            folder, QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
        )
        report["memory"]["8-bit"] = estimate_bytes(folder, QuantConfig(load_in_8bit=True))
    manifest = folder / "fastq-manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        report["manifest"] = {"shards": len(m.get("shards", {})), "fastq_version": m.get("fastq_version")}
        if verify:
            report["manifest"]["verified"] = verify_shards(folder, m)
    return report


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
