"""bitsandbytes' state-dict naming: the keys a 4-bit or 8-bit weight is saved under, in one place.

A 4-bit weight ``W`` (``Linear4bit``) is saved as ``W`` (packed codes) beside ``W.absmax``,
``W.quant_map``, with double quantization ``W.nested_absmax`` and ``W.nested_quant_map``, and
``W.quant_state.bitsandbytes__<nf4|fp4>`` (a JSON of the rest of its ``QuantState``): bitsandbytes'
``QuantState.as_dict(packed=True)`` and ``QuantState.from_dict`` (functional.py). An LLM.int8 weight
(``Linear8bitLt``) is saved as its int8 data beside the module's ``SCB`` (row scales) and
``weight_format`` (nn/modules.py, ``Linear8bitLt._save_to_state_dict``).
"""

from __future__ import annotations

__all__ = [
    "QUANT_STATE",
    "QUANT_STATE_PREFIX",
    "QUANT_STATE_SUFFIXES",
    "SCB",
    "WEIGHT_FORMAT",
    "quant_state_key",
    "quant_state_owner",
    "quant_state_stat",
    "quant_state_type",
]

#: Tensors bitsandbytes saves beside a 4-bit weight (``weight.`` + one of these).
QUANT_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")

#: The stem of the packed ``QuantState`` JSON's key (``weight.quant_state.bitsandbytes__nf4``).
QUANT_STATE = "quant_state"

#: What follows the weight's name and a dot in that key, before the quant type.
QUANT_STATE_PREFIX = QUANT_STATE + ".bitsandbytes__"

#: An int8 module's per-row scales (``module.SCB``).
SCB = "SCB"

#: An int8 module's weight layout marker (``module.weight_format``).
WEIGHT_FORMAT = "weight_format"


def quant_state_key(quant_type: str) -> str:
    """The key of a 4-bit weight's ``QuantState`` JSON after the weight's name and a dot:
    ``quant_state.bitsandbytes__nf4``."""
    return QUANT_STATE_PREFIX + quant_type


def quant_state_owner(key: str) -> str | None:
    """The weight a ``<weight>.quant_state.bitsandbytes__<type>`` key belongs to; None for other keys."""
    head, sep, _ = key.rpartition("." + QUANT_STATE_PREFIX)
    return head if sep else None


def quant_state_type(key: str) -> str | None:
    """The quant type (``nf4``, ``fp4``) a ``QuantState`` JSON key names; None for other keys."""
    return key.rpartition("__")[2] if "." + QUANT_STATE_PREFIX in key else None


def quant_state_stat(key: str) -> str:
    """The name ``Params4bit.from_prequantized`` expects the JSON under (``quantized_stats``): the key
    without the weight's name, ``quant_state.bitsandbytes__nf4``."""
    return QUANT_STATE + "." + key.rpartition(".")[2]
