"""``fastq.load``: a checkpoint to a quantized model on its devices. Orchestration only; each stage has
its file:

1. resolve.py: the source (folder with config.json, or one safetensors file), the quantization config
   (given, or the checkpoint's own ``quantization_config`` when it is pre-quantized) and the dtype;
2. skeleton.py: the model built empty (meta device), transformers' own quantizer swapping ``nn.Linear``
   for bitsandbytes modules, so the same modules come out as from ``from_pretrained``;
3. device_map.py and plan.py: the device map, and where every tensor comes from and how it is made;
4. placement.py: the fill. On the host the Rust pipeline quantizes on all cores while this thread places
   the unquantized tensors, then installs each packed result as it arrives (install.py) - nothing is
   quantized twice; tensors bound for a GPU go through the pinned ring (device_fill.py, transfer.py);
   under FSDP, shard.py fills only this rank's share;
5. dispatch.py: tie weights, synchronize, accelerate's hooks for offload, the attributes transformers sets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import device_map as dmap_mod
from . import shard as shard_mod
from . import transfer
from .checkpoint import Checkpoint
from .config import QuantConfig
from .device_fill import warm_kernels
from .dispatch import finalize, raise_glibc_mmap_threshold
from .early_reads import start_early_reads
from .errors import ConfigError
from .placement import fill, start_prefetch
from .plan import Plan, check_complete, make_plan, report_unused, warn_non_finite
from .resolve import Inputs, Source, resolve_inputs
from .skeleton import SKELETON_LOCK, build_empty, param_dtypes, quantized_modules, replace_modules

__all__ = ["Prepared", "load", "load_and_quantize_model", "prepare"]


def load(
    path: str | os.PathLike,
    cfg=None,
    device_map=None,
    *,
    model: torch.nn.Module | None = None,
    dtype: torch.dtype | str | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    threads: int | None = None,
    quantize_on: str = "auto",
    shard: bool | None = None,
) -> torch.nn.Module:
    """Loads a checkpoint as a (quantized) model on its devices.

    Args:
        path: a folder with config.json and safetensors (sharded or not), or one safetensors file
            (then pass ``model=``).
        cfg: ``fastq.QuantConfig``, transformers' ``BitsAndBytesConfig``, accelerate's
            ``BnbQuantizationConfig``, a dict, or None (no quantization, unless the checkpoint is
            already quantized: then its own config applies).
        device_map: None (first GPU, else CPU), a device, "auto", "balanced", "balanced_low_0",
            "sequential", or a dict of module name -> device ("cpu", "disk", GPU index).
        model: an empty model built under ``accelerate.init_empty_weights()``; default: built from
            config.json's ``architectures``.
        dtype: dtype of the unquantized layers (torch dtype, its name, or "auto" for the config's);
            default: the config's ``torch_dtype``, else what ``from_pretrained`` picks ("auto" on
            transformers 5). With ``model=`` and no dtype asked for, the model's own dtype.
        max_memory: per-device limits for the device-map strategies.
        offload_folder: where weights mapped to "disk" go.
        trust_remote_code: passed to transformers when building the model from its config.
        progress: show a progress bar over bytes.
        threads: quantization threads (default: ``FASTQ_NUM_THREADS`` or every core).
        quantize_on: where weights bound for a GPU are quantized: "device" (bitsandbytes' CUDA kernels,
            the bytes transformers gives on that GPU), "cpu" (fastq's Rust kernels, then copied), or
            "auto" (the device when it is a GPU). Weights for the CPU are always quantized on the CPU.
        shard: FSDP share mode (shard.py): each rank loads only the rows FSDP2's ``fully_shard`` gives it,
            on the CPU. None: on when torch.distributed is initialized with world size > 1 and
            ``device_map`` is None; True: on (needs a process group); False: a full model on every rank.

    Returns:
        The model, in eval mode, with bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers.
    """
    if quantize_on not in ("auto", "cpu", "device"):
        raise ConfigError(f'quantize_on={quantize_on!r}: use "auto", "cpu" or "device"')
    share = shard_mod.share_of(shard, device_map)
    if share is not None:
        device_map = "cpu"  # fully_shard moves each rank's shard to its device
    timeline = transfer.LAST_TIMELINE.reset()
    cpu_only = dmap_mod.cpu_only(device_map)
    gpu = not cpu_only and torch.cuda.is_available()
    if gpu:
        transfer.prefetch_ring()  # pinning the ring overlaps opening the checkpoint and building the skeleton
    # A caller's empty model keeps its own dtype unless one is asked for (then every floating tensor is
    # cast to it, as accelerate's load_and_quantize_model casts to torch_dtype).
    inputs = resolve_inputs(path, cfg, dtype, model)
    src, ckpt, qcfg, dtype = inputs.source, inputs.ckpt, inputs.qcfg, inputs.dtype
    timeline.mark("resolve")
    # A checkpoint read in place on the CPU (pre-quantized or plain) is made resident in the background,
    # with the GIL released, while the model skeleton is built below.
    in_place = (inputs.prequantized or qcfg is None) and cpu_only and share is None  # a share is read by rows
    prefetch = start_prefetch(ckpt, threads) if in_place else None
    warm = early = None
    if gpu:
        if qcfg is not None and not inputs.prequantized and quantize_on != "cpu":
            warm = warm_kernels(qcfg.spec, torch.device("cuda", torch.cuda.current_device()))
        elif share is None and (qcfg is None or inputs.prequantized):  # bytes kept as read: stream them now
            early = start_early_reads(ckpt, device_map, dtype, threads, timeline, inputs.prequantized)
    try:
        caller_model = model is not None
        if model is None and src.config_path is None:
            raise ConfigError(f"{src.path}: no config.json beside the weights; pass model= (an empty model)")
        with SKELETON_LOCK:
            if model is None:
                model = build_empty(src.folder, dtype, trust_remote_code)
            hfq = replace_modules(model, qcfg, device_map, dtype) if qcfg is not None else None
        timeline.mark("skeleton")
        dmap = dmap_mod.resolve(model, device_map, max_memory, hfq)
        if qcfg is not None:
            quantized = quantized_modules(model)
            offloaded = [m for m in quantized if dmap_mod.device_of(m, dmap) in ("cpu", "disk")]
            mixed = {"cpu", "disk"} & set(dmap.values()) and set(dmap.values()) - {"cpu", "disk"}
            if offloaded and mixed and qcfg.llm_int8_enable_fp32_cpu_offload and not isinstance(device_map, dict):
                # A strategy put quantized modules on the CPU/disk: rebuild with them left unquantized.
                if caller_model:
                    raise ConfigError(
                        f"device_map={device_map!r} offloads quantized modules (e.g. '{offloaded[0]}') to the CPU or "
                        "disk; with llm_int8_enable_fp32_cpu_offload they must stay unquantized, which needs the "
                        "map before the modules are swapped: pass the resolved map as a dict "
                        "(fastq.device_map.resolve on a fresh empty model gives it)"
                    )
                return load(
                    path, qcfg, dmap, model=None, dtype=dtype, max_memory=max_memory, offload_folder=offload_folder,
                    trust_remote_code=trust_remote_code, progress=progress, threads=threads, quantize_on=quantize_on,
                )
            dmap_mod.check_offload(dmap, quantized, qcfg.llm_int8_enable_fp32_cpu_offload)
        plan = _plan(model, inputs)
        if prefetch is not None:
            prefetch.join()
        timeline.mark("plan")
        if share is not None:
            offload_index = shard_mod.fill(model, ckpt, plan, qcfg, share, progress, threads)
        else:
            offload_index = fill(
                model, ckpt, plan, dmap, qcfg, offload_folder, progress, threads, prefetch is not None, quantize_on != "cpu",
                early,
            )
        timeline.mark("fill")
        if warm is not None:
            warm.join()
        raise_glibc_mmap_threshold()
        finalize(model, plan, dmap, hfq, qcfg, offload_folder, offload_index)
        timeline.mark("finalize")
        return model
    finally:
        if early is not None:
            early.cancel()  # a load that failed before its fill took them: stop the reads, free the buffers


def _plan(model, inputs: Inputs) -> Plan:
    """The plan of ``model`` over the checkpoint, checked complete: shared by ``load`` and ``prepare``."""
    src, qcfg, dtype = inputs.source, inputs.qcfg, inputs.dtype
    plan = make_plan(
        model,
        inputs.ckpt,
        dtype_of=param_dtypes(model, dtype, qcfg, inputs.cast),
        quantize_fp16_weights=not (qcfg is not None and qcfg.llm_int8_has_fp16_weight),
        quantize_dtype=dtype,
    )
    check_complete(plan, str(src.path))
    report_unused(plan, str(src.path))
    warn_non_finite(inputs.ckpt, plan)
    if inputs.prequantized and plan.by_kind("4bit", "int8"):
        names = ", ".join(e.name for e in plan.by_kind("4bit", "int8")[:3])
        raise ConfigError(f"{src.path} says it is quantized but holds unquantized weights for {names}")
    return plan


@dataclass
class Prepared:
    """What ``load`` decides before it reads a weight: the empty model (meta parameters, bitsandbytes
    modules in place), the plan, the resolved config and dtype, the opened checkpoint."""

    model: torch.nn.Module
    plan: Plan
    qcfg: QuantConfig | None
    dtype: torch.dtype
    ckpt: Checkpoint
    source: Source
    prequantized: bool
    hf_quantizer: object | None


def prepare(path, cfg=None, *, dtype=None, trust_remote_code: bool = False) -> Prepared:
    """The decisions of ``load(path, cfg, device_map="cpu", dtype=dtype)`` without loading anything:
    the skeleton is built on the meta device (no memory) and planned by the same code as ``load``.
    ``fastq.convert`` and ``fastq inspect`` use it, so they quantize exactly what ``load`` quantizes.

    Args:
        path: a folder with config.json and safetensors.
        cfg: as for ``load``.
        dtype: as for ``load``.
        trust_remote_code: passed to transformers when building the model from its config.

    Returns:
        A ``Prepared``.
    """
    inputs = resolve_inputs(path, cfg, dtype)
    src, qcfg, dtype = inputs.source, inputs.qcfg, inputs.dtype
    if src.config_path is None:
        raise ConfigError(f"{src.path}: no config.json beside the weights")
    with SKELETON_LOCK:
        model = build_empty(src.folder, dtype, trust_remote_code)
        hfq = replace_modules(model, qcfg, None, dtype) if qcfg is not None else None
    plan = _plan(model, inputs)
    return Prepared(model, plan, qcfg, dtype, inputs.ckpt, src, inputs.prequantized, hfq)


def load_and_quantize_model(
    model: torch.nn.Module,
    bnb_quantization_config,
    weights_location: str | os.PathLike | None = None,
    device_map=None,
    no_split_module_classes=None,
    max_memory=None,
    offload_folder=None,
    offload_state_dict: bool = False,
):
    """accelerate's ``load_and_quantize_model`` signature over ``fastq.load`` (``model`` built under
    ``init_empty_weights``; ``weights_location`` a safetensors file or folder)."""
    if weights_location is None:
        raise ConfigError("weights_location is required: the folder or file holding the model's weights")
    if no_split_module_classes is not None and not hasattr(model, "_no_split_modules"):
        model._no_split_modules = list(no_split_module_classes)
    del offload_state_dict  # fastq streams: the state dict is never held whole
    return load(
        weights_location, bnb_quantization_config, device_map, model=model, max_memory=max_memory,
        offload_folder=offload_folder, progress=False,
    )
