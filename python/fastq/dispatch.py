"""Dispatch, the last stage of a load: tie, synchronize, attach accelerate's hooks (``dispatch_model``
for a model spread over devices or offloaded to disk), set the attributes transformers sets
(``is_loaded_in_4bit``, ``hf_quantizer``, ``hf_device_map``); route the layers bitsandbytes' CPU kernel
cannot take (it would only fail at the first forward); and glibc's mmap threshold, adjusted once the
weights are in place.
"""

from __future__ import annotations

import ctypes
import warnings

import torch

from . import device_map as dmap_mod
from .errors import ConfigError
from .install import get_submodule
from .plan import Plan

__all__ = ["check_cpu_kernel_shapes", "finalize", "raise_glibc_mmap_threshold"]


def raise_glibc_mmap_threshold() -> None:
    """Lets glibc's malloc serve torch's large activations from its heap, as it does after any load that
    freed large buffers through it (transformers' does; fastq's buffers come from Rust's allocator).

    glibc starts with a 128 KiB mmap threshold and raises it to the size of each mmapped chunk freed
    (up to 32 MiB). Until then every activation above 128 KiB is a fresh mmap whose page faults and
    munmap dominated the first forward passes of a fastq-loaded int8 model on the CPU (6-9 s instead
    of 0.45 s for 1.1B parameters). One malloc/free of 32 MiB makes the same adjustment now.
    """
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        libc.free(libc.malloc(32 << 20))
    except (OSError, AttributeError):  # not glibc: nothing to adjust
        pass


def finalize(model, plan: Plan, dmap: dict, hfq, qcfg, offload_folder, offload_index) -> None:
    """Makes the filled model what ``from_pretrained`` returns: shared parameters tied again, buffers on
    their module's device, every device synchronized, accelerate's hooks attached where the model spans
    several devices or the disk (``dispatch_model``), transformers' attributes set, eval mode.

    Raises:
        ConfigError: a parameter was left on the meta device (not mapped to disk).
    """
    # Re-tie shared parameters (the fill replaced one name of each group).
    for e in plan.by_kind("tied"):
        mod_name, _, leaf = e.name.rpartition(".")
        src_mod, _, src_leaf = e.tied_to.rpartition(".")
        get_submodule(model, mod_name)._parameters[leaf] = get_submodule(model, src_mod)._parameters[src_leaf]
    # Buffers built at init (rotary tables...) follow their module's device.
    for name, buf in list(model.named_buffers()):
        dev = dmap_mod.device_of(name, dmap)
        if buf is not None and dev not in (None, "disk", "cpu") and buf.device.type != "meta":
            mod_name, _, leaf = name.rpartition(".")
            get_submodule(model, mod_name)._buffers[leaf] = buf.to(dev)
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    on_disk = {n for n in still_meta if dmap_mod.device_of(n, dmap) == "disk"}
    if set(still_meta) - on_disk:
        raise ConfigError(f"parameters left without weights: {sorted(set(still_meta) - on_disk)[:8]}")
    devices = set(dmap.values())
    for dev in devices:  # the host-to-GPU copies (transfer.py) are asynchronous
        if isinstance(dev, str) and dev.startswith("cuda"):
            torch.cuda.synchronize(dev)
    if len(devices) > 1 or "disk" in devices:
        from accelerate import dispatch_model

        kwargs = {"offload_dir": offload_folder, "offload_index": offload_index or None}
        skip = getattr(model, "_skip_keys_device_placement", None)
        if skip is not None:
            kwargs["skip_keys"] = skip
        dispatch_model(model, device_map=dmap, **kwargs)
    if qcfg is not None:
        model.is_loaded_in_4bit = qcfg.is_4bit
        model.is_loaded_in_8bit = qcfg.is_8bit
        if hfq is not None:
            model.hf_quantizer = hfq
            hfq.postprocess_model(model)
    if hasattr(model, "hf_device_map") or len(devices) > 1:
        model.hf_device_map = dmap
    check_cpu_kernel_shapes(model)
    model.eval()


def check_cpu_kernel_shapes(model) -> list[str]:
    """Routes 4-bit layers that bitsandbytes' AVX512-BF16 CPU kernel cannot take to its generic kernel.

    bitsandbytes 0.50 repacks a ``Linear4bit`` weight for that kernel at its first CPU inference forward
    (nn/modules.py ``Linear4bit.forward`` -> functional.py ``_convert_weight_packed_for_cpu``), which
    asserts ``out_features % 32 == 0`` ("N must be divisible by block_n") and an even ``in_features``, and
    reshapes the absmax per row (``in_features % blocksize == 0``); other shapes fail there, in
    transformers' models too. Layers with an ``out_features`` or odd ``in_features`` it refuses run on
    the generic kernel instead (the same numbers: tests/test_dispatch.py); layers whose rows cross
    absmax blocks get a warning, since bitsandbytes' generic CPU kernel misreads some of them too.

    Returns:
        The names of the layers routed to the generic kernel.
    """
    import bitsandbytes as bnb

    routed, crossing = [], []
    for name, m in model.named_modules():
        if not isinstance(m, bnb.nn.Linear4bit) or not getattr(m, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(m.weight, "quant_state", None)
        if state is None or m.weight.device.type != "cpu":
            continue
        n, k = m.out_features, m.in_features
        if k % state.blocksize:
            crossing.append(name)
        elif n % 32 or k % 2:
            m.support_avx512bf16_for_cpu = False
            routed.append(name)
    if crossing:
        warnings.warn(
            f"{len(crossing)} 4-bit layer(s) have in_features that are not a multiple of the blocksize "
            f"(e.g. {crossing[0]}): bitsandbytes' CPU kernels cannot run them correctly (the AVX512-BF16 one "
            "fails at the first forward, the generic one misreads rows that cross blocks); use a blocksize "
            "that divides in_features, or run them on a GPU",
            stacklevel=3,
        )
    return routed

