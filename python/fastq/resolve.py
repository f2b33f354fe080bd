"""The first stage of a load: where the config and the weights are (a folder with config.json, or one
safetensors file), which quantization applies (the one given, or the checkpoint's own
``quantization_config`` when it is pre-quantized), and the dtype of the unquantized layers.

``fastq.load`` and ``fastq.loader.prepare`` (hence ``convert`` and ``inspect``) both start here, so
they decide alike.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .config import QuantConfig, dtype_named
from .errors import ConfigError
from .source import (
    Source,
    config_dtype_name,
    require_bitsandbytes,
    saved_quantization,
    transformers_reads_config_dtype,
)

__all__ = ["Inputs", "Source", "dtype_from_name", "resolve_inputs"]


@dataclass
class Inputs:
    """What a load starts from, resolved: the source, the opened checkpoint, the quantization config
    (None: none), whether the checkpoint is pre-quantized, the dtype of the unquantized layers, and
    whether every floating tensor is cast to it (a caller's model with a dtype asked for)."""

    source: Source
    ckpt: Checkpoint
    qcfg: QuantConfig | None
    prequantized: bool
    dtype: torch.dtype
    cast: bool


def resolve_inputs(path, cfg, dtype, model: torch.nn.Module | None = None) -> Inputs:
    """Resolves a load's source, quantization config and dtype, then opens the checkpoint.

    Args:
        path: a folder with config.json and safetensors, or one safetensors file.
        cfg: as for ``fastq.load``.
        dtype: as for ``fastq.load`` (None, a torch dtype, its name, or "auto").
        model: the caller's empty model, if any: it keeps its own dtype unless one is asked for (then
            every floating tensor is cast to it, as accelerate's load_and_quantize_model casts to
            torch_dtype).

    Returns:
        The ``Inputs``.
    """
    src = Source(path)
    raw_config = src.raw_config()
    qcfg, prequantized = _quant_config(cfg, raw_config, src)
    cast = model is not None and _explicit_dtype(dtype, qcfg)
    if model is not None and not cast:
        dtype = _model_dtype(model)
    else:
        dtype = _resolve_dtype(dtype, qcfg, raw_config)
    ckpt = Checkpoint(src.weights)
    return Inputs(src, ckpt, qcfg, prequantized, dtype, cast)


def _quant_config(cfg, raw_config: dict, src: Source) -> tuple[QuantConfig | None, bool]:
    """The config to apply and whether the checkpoint is already quantized (another library's
    quantization is refused: its weights are not bitsandbytes', nor are they unquantized)."""
    saved = saved_quantization(raw_config, src.config_path)
    if saved is not None:
        require_bitsandbytes(saved, src.config_path)
        saved_cfg = _saved_config(saved, src)
        given = QuantConfig.coerce(cfg)
        if given is not None and given != saved_cfg:
            warnings.warn(
                "the checkpoint is already quantized; its own quantization_config is used and the one passed "
                "to fastq.load is ignored",
                UserWarning,
                stacklevel=4,  # the caller of fastq.load (here < resolve_inputs < load < caller)
            )
        return saved_cfg, True
    return QuantConfig.coerce(cfg), False


def _saved_config(saved: dict, src: Source) -> QuantConfig:
    """config.json's bitsandbytes ``quantization_config`` as a QuantConfig; an invalid one is a
    ``ConfigFileError`` naming the file."""
    from .errors import ConfigFileError

    try:
        return QuantConfig.from_dict(saved)
    except ConfigFileError:
        raise
    except ConfigError as e:
        raise ConfigFileError(f"{src.config_path}: its quantization_config is invalid: {e}",
                              path=src.config_path) from None


def _explicit_dtype(dtype, qcfg: QuantConfig | None) -> bool:
    return dtype is not None or (qcfg is not None and qcfg.torch_dtype is not None)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype an empty model was built in (its first floating parameter's)."""
    first = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), None)
    return first or torch.get_default_dtype()


def _resolve_dtype(dtype, qcfg: QuantConfig | None, raw_config: dict) -> torch.dtype:
    """dtype of the unquantized layers: the argument, else the config's torch_dtype, else what the installed
    transformers' ``from_pretrained`` picks without ``dtype=`` ("auto": config.json's dtype, on transformers
    5; torch's default, float32, on transformers 4)."""
    if dtype is None and qcfg is not None and qcfg.torch_dtype is not None:
        dtype = qcfg.torch_dtype
    if dtype is None and transformers_reads_config_dtype():
        dtype = "auto"
    if dtype == "auto":
        return dtype_from_name(config_dtype_name(raw_config), "config.json's dtype")
    if dtype is None:
        return torch.get_default_dtype()
    if isinstance(dtype, str):
        return dtype_from_name(dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype={dtype!r} is not a floating-point torch dtype; {_DTYPE_HINT}")
    return dtype


_DTYPE_HINT = 'use e.g. "bfloat16", "float16", "float32" or "auto" (the config\'s)'


def dtype_from_name(name: str, what: str = "dtype") -> torch.dtype:
    """The floating-point torch dtype a name stands for (``"bfloat16"``, ``"torch.float16"``, ``"bf16"``).

    Raises:
        ConfigError: the name is no torch dtype, or not a floating-point one (transformers builds no
            model in an integer dtype).
    """
    dtype = dtype_named(name)
    if dtype is None:
        raise ConfigError(f"{what} {name!r} is not a torch dtype; {_DTYPE_HINT}")
    if not dtype.is_floating_point:
        raise ConfigError(f"{what} {name!r} is not a floating-point dtype; {_DTYPE_HINT}")
    return dtype
