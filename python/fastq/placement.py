"""Placing tensors: every tensor of the plan into its parameter or buffer, on its device.

On the host path (this file), the Rust pipeline quantizes the weights in the background on all cores
while this thread places the unquantized tensors and the pre-quantized ones, then installs each packed
result as it arrives (install.py) - nothing is quantized twice. Tensors mapped to "disk" are offloaded
as accelerate does. Tensors bound for a GPU go through the pinned ring instead (device_fill.py,
transfer.py). A checkpoint read in place on the CPU is made resident ahead of use (``start_prefetch``,
``Checkpoint.populate``) rather than faulted in page by page.
"""

from __future__ import annotations

import os
import threading

import torch

from . import device_map as dmap_mod
from . import transfer
from .bnb_format import QUANT_STATE, SCB, quant_state_stat
from .checkpoint import Checkpoint
from .device_fill import fill_on_device
from .device_map import cuda_device
from .errors import ConfigError
from .install import get_submodule, prequantized_4bit, prequantized_int8, set_4bit, set_int8, set_plain
from .plan import Plan
from .progress import byte_bar

__all__ = ["fill", "start_prefetch"]


def start_prefetch(ckpt: Checkpoint, threads) -> threading.Thread:
    """Makes the whole checkpoint resident in the background (GIL released): for a checkpoint read in
    place on the CPU, started while the skeleton is built."""
    t = threading.Thread(target=ckpt.populate, args=(ckpt.keys(),), kwargs={"threads": threads}, daemon=True)
    t.start()
    return t


def fill(
    model, ckpt: Checkpoint, plan: Plan, dmap: dict, qcfg, offload_folder, progress: bool, threads,
    resident_already: bool = False, quantize_on_device: bool = True, early=None,
):
    """Places every tensor. Tensors bound for a GPU stream through the pinned ring (device_fill.py),
    quantized there unless asked otherwise; for the rest, the Rust pipeline quantizes in the background
    while the unquantized tensors are placed here; packed results are installed as they arrive.

    ``early``: the tensors already streaming to the GPU (``early_reads.start_early_reads``).

    Returns:
        The index of the tensors offloaded to disk (accelerate's ``offload_index``; empty if none).
    """
    bar = byte_bar(plan.nbytes, "fastq.load", disable=not progress)
    if any(cuda_device(v) is not None for v in dmap.values()):
        left = fill_on_device(
            model, ckpt, [e for e in plan.entries if e.kind != "tied"], dmap, qcfg.spec if qcfg else None,
            quantize=quantize_on_device, threads=threads, timeline=transfer.LAST_TIMELINE.timeline,
            on_placed=lambda e: bar.update(e.nbytes), early=early,
        )
        plan = Plan(left, plan.missing, plan.unused)

    # Every weight streams through the Rust pipeline; one stored in another dtype than the one it is
    # quantized from (a float32 checkpoint loaded as bfloat16) is cast there first (plan.Entry.dtype).
    quantized = plan.by_kind("4bit", "int8")
    jobs = [(e.source, qcfg.spec, e.transpose, e.dtype) for e in quantized]
    pending = {e.source: e for e in quantized}
    results = ckpt.quantize(jobs, threads=threads) if jobs else iter(())
    _reserve_packed(model, quantized, dmap)
    # Tensors used in place on the CPU (zero-copy views of the mapping) are made resident now, in
    # parallel, rather than faulted in page by page on first use.
    resident = [
        src
        for e in plan.by_kind("plain", "4bit-pre", "int8-pre")
        if dmap_mod.device_of(e.name, dmap) == "cpu"
        for src in (e.source, *e.extra.values())
        if not e.pieces  # gathered with pread, never mapped
    ]
    if resident and not resident_already:
        ckpt.populate(resident, threads=threads)
    offload_index: dict = {}
    try:
        for e in plan.by_kind("plain"):
            dev = dmap_mod.device_of(e.name, dmap)
            value = gather(ckpt, e, threads) if e.pieces else ckpt.get(e.source)
            if e.transpose:
                value = value.t()
            if dev == "disk":
                _offload(e.name, value.to(e.dtype) if e.dtype else value, offload_folder, offload_index)
            else:
                set_plain(model, e.name, value, dev, e.dtype)
            bar.update(e.nbytes)
        for e in plan.by_kind("4bit-pre", "int8-pre"):
            module = get_submodule(model, e.module)
            dev = dmap_mod.device_of(e.name, dmap)
            weight = ckpt.get(e.source)
            if e.kind == "4bit-pre":
                stats = {k: ckpt.get(v) for k, v in e.extra.items() if k != QUANT_STATE}
                qs = e.extra[QUANT_STATE]  # "<module>.weight.quant_state.bitsandbytes__nf4"
                stats[quant_state_stat(qs)] = ckpt.get(qs)
                prequantized_4bit(module, weight, stats, dev)
            else:
                prequantized_int8(module, weight, ckpt.get(e.extra[SCB]), dev)
            bar.update(e.nbytes)
        for name, res in results:
            e = pending.pop(name)
            _install(model, e, res, dmap, qcfg)
            bar.update(e.nbytes)
        # A shard cut short during the fill reads as zeros instead of ending the process (guard.rs):
        # report it rather than return a model holding them.
        ckpt.check(src for e in plan.by_kind("plain", "4bit-pre", "int8-pre") for src in (e.source, *e.extra.values()))
    finally:
        bar.close()
        if hasattr(results, "close"):
            results.close()
    if offload_index:
        from accelerate.utils import save_offload_index

        save_offload_index(offload_index, offload_folder)
    return offload_index


def gather(ckpt: Checkpoint, e, threads) -> torch.Tensor:
    """A tensor transformers assembles from several checkpoint tensors (``Entry.pieces``), read by the
    Rust readers straight to its offsets in one host buffer (GIL released, no concatenation here)."""
    from . import _fastq

    buf = torch.empty(e.nbytes, dtype=torch.uint8)
    reader = _fastq.Reader(ckpt.native, threads)
    reader.submit([(src, 0, n, at) for src, at, n in e.pieces], buf.numpy()).wait()
    return buf.view(ckpt.meta(e.source).torch_dtype).view(e.shape)


def _reserve_packed(model, quantized, dmap: dict) -> None:
    """Room in each GPU's allocator cache for the packed weights the host path will copy there (one block,
    not a 2 MiB-rounded segment per weight: ``transfer.reserve_cached``), sized by
    ``device_map.quantized_sizes``."""
    gpu = [(e, dev) for e in quantized if (dev := cuda_device(dmap_mod.device_of(e.name, dmap))) is not None]
    if not gpu:
        return
    sizes, per_device = dmap_mod.quantized_sizes(model), {}
    for e, dev in gpu:
        per_device[dev] = per_device.get(dev, 0) + sizes[e.name][0]
    for dev, nbytes in per_device.items():
        transfer.reserve_cached(dev, nbytes)


def _install(model, e, res, dmap: dict, qcfg) -> None:
    module = get_submodule(model, e.module)
    dev = dmap_mod.device_of(e.name, dmap)
    if qcfg.is_8bit:
        set_int8(module, res[0], res[1], dev)
    else:
        set_4bit(module, res[0], res[1], dev)


def _offload(name: str, value: torch.Tensor, folder, index: dict) -> None:
    from accelerate.utils import offload_weight

    if folder is None:
        raise ConfigError("the device map sends weights to disk: pass offload_folder=")
    os.makedirs(folder, exist_ok=True)
    offload_weight(value, name, folder, index=index)
