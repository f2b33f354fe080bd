"""Installing weights: bitsandbytes parameters built from fastq's packed buffers (nothing is quantized a
second time), pre-quantized weights as ``from_pretrained`` installs them, and plain tensors.

``Params4bit`` is created with ``bnb_quantized=True`` and its ``QuantState``; ``Int8Params`` with its
int8 data, ``CB`` and ``SCB``. Moving them to a device moves the packed bytes and statistics only.
"""

from __future__ import annotations

import torch

from .transfer import to_device

__all__ = [
    "get_submodule", "prequantized_4bit", "prequantized_int8", "saved_quant_state", "set_4bit", "set_int8", "set_plain",
]


def get_submodule(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``model.get_submodule(name)``; the model itself for ``""``."""
    return model.get_submodule(name) if name else model


def _device(device) -> torch.device:
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def _set_weight(module, w: torch.nn.Parameter) -> None:
    """``module.weight = w`` without ``nn.Module.__setattr__``: accelerate's ``init_empty_weights`` patches
    ``register_parameter`` process-wide while a skeleton is built, so a load in another thread had its
    freshly installed weights sent to the meta device."""
    module._parameters["weight"] = w


def set_4bit(module, packed: torch.Tensor, state, device) -> None:
    """Installs a packed 4-bit weight (``fastq.ops``-style result) on a ``Linear4bit``."""
    import bitsandbytes as bnb

    device = _device(device)
    if device.type == "cuda":
        packed = to_device(packed, device)
        state.to(device)  # the statistics: small, moved in place
    w = bnb.nn.Params4bit(
        data=packed,
        requires_grad=False,
        quant_state=state,
        blocksize=state.blocksize,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        quant_storage=packed.dtype,
        module=module,
        bnb_quantized=True,
    )
    if device.type not in ("cpu", "cuda"):
        w = w.to(device)  # bnb_quantized: moves bytes and QuantState, never re-quantizes
    _set_weight(module, w)
    module.quant_state = w.quant_state


def prequantized_4bit(module, weight: torch.Tensor, stats: dict[str, torch.Tensor], device) -> None:
    """Installs a 4-bit weight saved by transformers/bitsandbytes, as ``Params4bit.from_prequantized``
    does. When the ring has put the weight and its statistics on the GPU already, the ``QuantState`` is
    ``saved_quant_state``'s (bitsandbytes' ``from_dict`` would upload the nested offset from pageable
    memory, a stream sync at every module: the host then waits for every copy queued before it)."""
    import bitsandbytes as bnb

    device = _device(device)
    if device.type == "cuda" and weight.device == device:
        set_4bit(module, weight, saved_quant_state(stats, device), device)
        return
    w = bnb.nn.Params4bit.from_prequantized(
        data=weight, quantized_stats=stats, requires_grad=False, device=device, module=module
    )
    _set_weight(module, w)


def saved_quant_state(stats: dict[str, torch.Tensor], device: torch.device):
    """``QuantState.from_dict(stats, device)`` for statistics already on ``device``: the same fields from
    the same JSON (bitsandbytes' ``unpack_tensor_to_dict``), the nested offset made on the device by a
    fill of the same float rather than uploaded (tests/test_prequantized.py compares the two)."""
    import bitsandbytes.functional as bf

    qs = dict(stats)
    for k in [k for k in qs if "quant_state" in k]:
        qs.update(bf.unpack_tensor_to_dict(qs.pop(k)))
    qs = {k.split(".")[-1]: v for k, v in qs.items()}
    offset = state2 = None
    if "nested_absmax" in qs:
        # from_dict: torch.tensor(float(x)), in the default dtype, then .to(device)
        offset = torch.full((), float(qs["nested_offset"]), dtype=torch.get_default_dtype(), device=device)
        state2 = bf.QuantState(absmax=qs["nested_absmax"].to(device), blocksize=qs["nested_blocksize"],
                               code=qs["nested_quant_map"].to(device), dtype=getattr(torch, qs["nested_dtype"]))
    return bf.QuantState(
        quant_type=qs["quant_type"], absmax=qs["absmax"].to(device), blocksize=qs["blocksize"],
        code=qs["quant_map"].to(device), dtype=getattr(torch, qs["dtype"]),
        shape=torch.Size(qs["shape"]) if qs["shape"] is not None else None, offset=offset, state2=state2,
    )


def set_int8(module, cb: torch.Tensor, scb: torch.Tensor, device) -> None:
    """Installs an LLM.int8 weight (CB, SCB) on a ``Linear8bitLt``."""
    import bitsandbytes as bnb

    device = _device(device)
    if device.type == "cuda":
        cb, scb = to_device(cb, device), scb.to(device)
    w = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
    w.CB, w.SCB = cb, scb
    if device.type not in ("cpu", "cuda"):
        w = w.to(device)  # int8 data: moved, not quantized again
    _set_weight(module, w)


def prequantized_int8(module, weight: torch.Tensor, scb: torch.Tensor, device) -> None:
    """Installs an int8 weight saved by transformers/bitsandbytes."""
    set_int8(module, weight, scb.to(torch.float32), device)


def set_plain(model: torch.nn.Module, name: str, value: torch.Tensor, device, dtype=None) -> None:
    """Puts an unquantized tensor in place (a parameter or a buffer), converting dtype if asked.

    On the CPU with the checkpoint's dtype this keeps the memory-mapped tensor: no copy.
    """
    import bitsandbytes as bnb

    mod_name, _, leaf = name.rpartition(".")
    module = get_submodule(model, mod_name)
    device = _device(device)
    if dtype is not None and value.dtype != dtype:
        value = value.to(dtype)
    if device.type != "cpu":
        value = to_device(value, device)
    from .experts import QuantizedExperts

    if isinstance(module, QuantizedExperts) and leaf in module.shapes:
        module.install(leaf, value)  # quantized per expert where it landed; the bf16 copy is dropped
        return
    old = module._parameters.get(leaf)
    if old is not None or leaf in module._parameters:
        if isinstance(old, bnb.nn.Int8Params):  # llm_int8_has_fp16_weight: 16-bit main weights
            module._parameters[leaf] = bnb.nn.Int8Params(value, requires_grad=old.requires_grad, has_fp16_weights=True)
        else:
            requires_grad = old.requires_grad if old is not None else False
            module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=requires_grad and value.is_floating_point())
    else:
        module._buffers[leaf] = value
