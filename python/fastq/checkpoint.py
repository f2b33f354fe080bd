"""``fastq.open``: a checkpoint's tensors as zero-copy torch tensors, and parallel quantization."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from . import _fastq
from .dtypes import ST_TO_TORCH, float_input_name
from .results import int8_from_result, quant_state_from_result, wrap

__all__ = ["SPEC_INT8", "Checkpoint", "Spec4bit", "TensorMeta", "open"]


@dataclass(frozen=True)
class TensorMeta:
    """Name, safetensors dtype, shape, shard file and byte size of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_TO_TORCH[self.dtype]


@dataclass(frozen=True)
class Spec4bit:
    """How to quantize a tensor to 4 bits."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    quant_storage: torch.dtype = torch.uint8


#: Quantize to LLM.int8.
SPEC_INT8 = "int8"


class Checkpoint:
    """An opened safetensors checkpoint: a file, a folder with ``model.safetensors.index.json``, or a
    folder of shards. Every shard is memory-mapped and its header validated on opening."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._ck = _fastq.Checkpoint(self.path)
        self._meta = {
            name: TensorMeta(name, dtype, tuple(shape), file, nbytes)
            for name, dtype, shape, file, nbytes in self._ck.tensors()
        }

    @property
    def native(self):
        """The extension's checkpoint object (for the binding's readers)."""
        return self._ck

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def __len__(self) -> int:
        return len(self._meta)

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def keys(self) -> list[str]:
        """Tensor names, shard by shard in file order."""
        return list(self._meta)

    def meta(self, name: str) -> TensorMeta:
        if name not in self._meta:
            self._ck.get(name)  # raises UnknownTensorError naming the checkpoint
        return self._meta[name]

    @property
    def shard_paths(self) -> list[str]:
        return self._ck.shard_paths()

    @property
    def total_bytes(self) -> int:
        return self._ck.total_bytes()

    def metadata(self, shard: int = 0) -> dict[str, str]:
        """The ``__metadata__`` of a shard's header."""
        return self._ck.metadata(shard)

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a CPU tensor over the mapped file (no copy; writes stay private).

        Raises:
            TruncatedShardError: the shard was cut short since it was opened and lost this tensor's bytes.
        """
        m = self.meta(name)
        return wrap(self._ck.get(name), m.torch_dtype, m.shape)

    def populate(self, names: Iterable[str], *, threads: int | None = None) -> None:
        """Makes the named tensors resident in this process ahead of use, in parallel with the GIL
        released (``MADV_POPULATE_READ``: one pass of the kernel instead of a page fault per 4 KiB).

        Raises:
            TruncatedShardError: a shard was cut short since it was opened and lost one of these tensors.
        """
        self._ck.populate(list(names), threads=threads)

    def check(self, names: Iterable[str] | None = None) -> None:
        """Checks that the named tensors (every tensor when None) still have their bytes: a shard that
        another process cut short while it was mapped does not end this process (the lost pages read as
        zeros, see rust/core/guard.rs), and this is where it is reported. ``get``, ``populate`` and
        ``quantize`` check the tensors they touch; tensors already handed out read zeros silently
        until a check.

        Raises:
            TruncatedShardError: naming the shard and the first tensor that lost bytes.
        """
        self._ck.check(None if names is None else list(names))

    def quantize(
        self,
        jobs: Iterable[tuple],
        *,
        threads: int | None = None,
        device: torch.device | str | None = None,
        release_pages: bool = True,
    ) -> Iterator[tuple[str, tuple]]:
        """Quantizes many tensors on all cores (GIL released); yields ``(name, result)`` in job order.

        Each job is ``(name, spec)``, ``(name, spec, transpose)`` or ``(name, spec, transpose, cast)``;
        ``transpose`` quantizes the transpose of a 2-D weight (GPT-2's ``Conv1D``), ``cast`` (a torch
        float dtype) converts the weight before quantizing it, as transformers does when the model's
        dtype is not the checkpoint's. A job may also be a ``_fastq.Job`` (for what the tuples do not
        say: ``Job.four_bit(..., range=(start, end))`` quantizes only those elements of the flattened
        weight, FSDP's share); its packed bytes are viewed as its ``storage``. ``result`` is
        ``(packed, QuantState)`` for a 4-bit job (a range's ``QuantState`` has the range's 1-D shape)
        and ``(CB, SCB)`` for int8.
        """
        raw, storage = [], {}
        for job in jobs:
            if isinstance(job, _fastq.Job):
                raw.append(job)
                if job.kind == "4bit":
                    storage[job.name] = ST_TO_TORCH[job.storage]
                continue
            name, spec = job[0], job[1]
            transpose = bool(job[2]) if len(job) > 2 else False
            cast = float_input_name(job[3]) if len(job) > 3 and job[3] is not None else None
            if spec == SPEC_INT8:
                raw.append(_fastq.Job.int8(name, transpose=transpose, cast=cast))
            else:
                raw.append(_fastq.Job.four_bit(
                    name, spec.quant_type, spec.blocksize, spec.double_quant, transpose=transpose, cast=cast
                ))
                storage[name] = spec.quant_storage
        # The Rust worker starts now, before the caller asks for the first result.
        it = self._ck.quantize(raw, threads=threads, release_pages=release_pages)
        return _results(it, storage, device)

    def quantize_all(self, jobs, **kw) -> dict[str, tuple]:
        """``dict(self.quantize(jobs, **kw))``."""
        return dict(self.quantize(jobs, **kw))


def _results(it, storage: dict, device) -> Iterator[tuple[str, tuple]]:
    try:
        for name, res in it:
            if isinstance(res, _fastq.PackedInt8):
                yield name, int8_from_result(res, device)
            else:
                yield name, quant_state_from_result(res, device, storage[name])
    finally:
        it.close()


def open(path: str | os.PathLike) -> Checkpoint:
    """Opens a checkpoint (see ``Checkpoint``)."""
    return Checkpoint(path)
