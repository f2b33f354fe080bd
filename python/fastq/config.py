"""``QuantConfig``: the bitsandbytes settings of transformers' ``BitsAndBytesConfig`` and accelerate's
``BnbQuantizationConfig`` in one validated object. Names and defaults are transformers'
(``transformers/utils/quantization_config.py``); accelerate's differ and ``coerce`` keeps its values."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import warnings
from typing import Any

import torch

from .checkpoint import SPEC_INT8, Spec4bit
from .dtypes import FLOAT_INPUTS
from .errors import ConfigError
from .source import QUANT_METHOD

__all__ = ["QuantConfig", "dtype_named", "parse_dtype"]

_log = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")
# bitsandbytes' quantize_4bit accepts these (functional.py, `blocksize not in (32, ..., 4096)`).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# The strings transformers' BitsAndBytesConfig accepts for bnb_4bit_quant_storage.
STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT_DTYPES = FLOAT_INPUTS
_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
# field: (the dtypes it accepts, what None stands for)
_DTYPE_FIELDS = {
    "bnb_4bit_compute_dtype": (FLOAT_DTYPES, torch.float32),
    "bnb_4bit_quant_storage": (STORAGE_DTYPES, torch.uint8),
    "torch_dtype": (FLOAT_DTYPES, None),
}
# Fields that transformers' config.json entry does not hold; they travel in its "fastq" sub-dict.
_EXTRA_FIELDS = ("skip_modules", "keep_in_fp32_modules", "torch_dtype", "blocksize", "quantize_experts")


def parse_dtype(value: Any, field: str, allowed: tuple[torch.dtype, ...], default=None) -> torch.dtype:
    """Turns ``torch.bfloat16``, ``"bfloat16"``, ``"torch.bfloat16"`` or ``"bf16"`` into a torch dtype.

    Args:
        value: the dtype or its name.
        field: the field name, for the error message.
        allowed: the dtypes the field accepts.
        default: what None stands for.

    Returns:
        The torch dtype (``default`` for None).
    """
    if value is None:
        return default
    names = ", ".join(repr(str(d).removeprefix("torch.")) for d in allowed)
    dtype = dtype_named(value) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{field}={value!r} is not a dtype; pass a torch.dtype or one of {names}")
    if dtype not in allowed:
        raise ConfigError(f"{field}={value!r} is not supported; use one of {names}")
    return dtype


def dtype_named(name: str) -> torch.dtype | None:
    """The torch dtype ``"bfloat16"``, ``"torch.bfloat16"``, ``"BF16"`` or ``"bf16"`` stands for; None
    for a name that is no dtype."""
    key = name.strip().lower().removeprefix("torch.")
    dtype = getattr(torch, _ALIASES.get(key, key), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # what transformers' to_dict writes: "bfloat16"


def _module_list(value: Any, field: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise ConfigError(f"{field} must be a list of module names, not a string; write [{value!r}]")
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) for m in value):
        raise ConfigError(f"{field} must be a list of module names (strings) or None, got {value!r}")
    return list(value)


def _merge(*lists: list[str] | None) -> list[str]:
    return list(dict.fromkeys(m for names in lists if names for m in names))


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class QuantConfig:
    """How fastq quantizes a model: LLM.int8 (``load_in_8bit``) or 4-bit NF4/FP4 (``load_in_4bit``).

    Immutable; ``dataclasses.replace(cfg, ...)`` makes a changed, revalidated copy. Fields that do not
    apply to the chosen mode (``bnb_4bit_*`` with 8-bit, ``llm_int8_threshold`` with 4-bit) are
    validated and kept but have no effect, as in transformers.

    Args:
        load_in_8bit: quantize linear layers to LLM.int8.
        load_in_4bit: quantize linear layers to 4 bits. Exactly one of the two must be True; for no
            quantization pass ``None`` instead of a QuantConfig.
        llm_int8_threshold: outlier threshold applied to activations at inference (8-bit).
        llm_int8_skip_modules: module names left unquantized. ``None`` means the default skips
            (tied weights and the output head); a list, even an empty one, replaces them.
        llm_int8_enable_fp32_cpu_offload: keep modules mapped to cpu/disk unquantized.
        llm_int8_has_fp16_weight: keep 16-bit main weights in Linear8bitLt (training).
        bnb_4bit_compute_dtype: dtype of the 4-bit matmul; default float32.
        bnb_4bit_quant_type: ``"fp4"`` (default) or ``"nf4"``.
        bnb_4bit_use_double_quant: quantize the absmax statistics again (blocks of 256).
        bnb_4bit_quant_storage: dtype the packed 4-bit bytes are viewed as; default uint8.
        skip_modules: accelerate's skip list; merged with ``llm_int8_skip_modules``.
        keep_in_fp32_modules: accelerate's list of modules left unquantized and kept in float32.
        torch_dtype: dtype of the unquantized layers; ``None`` leaves it to the loader.
        blocksize: 4-bit block size, a power of two from 32 to 4096. transformers always writes 64,
            but its loader reads the block size from each tensor's ``quant_state`` JSON
            (``Params4bit.from_prequantized``), so other sizes load in transformers too.
        quantize_experts: also quantize MoE experts that transformers holds as fused 3-D parameters
            (4-bit or int8 per expert, experts.py), which transformers + bitsandbytes leave in bf16.
            Off by default, so the default model is transformers' own.
    """

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: torch.dtype | str | None = None
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: torch.dtype | str | None = None
    skip_modules: list[str] | None = None
    keep_in_fp32_modules: list[str] | None = None
    torch_dtype: torch.dtype | str | None = None
    blocksize: int = 64
    quantize_experts: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__.__get__(self)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are both True; set only one of them")
        if not (self.load_in_4bit or self.load_in_8bit):
            raise ConfigError(
                "neither load_in_4bit nor load_in_8bit is True; set one of them, or pass None instead of a "
                "QuantConfig to load without quantization"
            )
        t = self.llm_int8_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t >= 0):
            raise ConfigError(f"llm_int8_threshold must be a finite number >= 0 (default 6.0), got {t!r}")
        set_("llm_int8_threshold", float(t))  # transformers rejects ints
        for name in _LIST_FIELDS:
            set_(name, _module_list(getattr(self, name), name))
        if (qt := self.bnb_4bit_quant_type) not in QUANT_TYPES:
            raise ConfigError(f"bnb_4bit_quant_type={qt!r} is unknown; use 'nf4' or 'fp4'")
        for name, (allowed, default) in _DTYPE_FIELDS.items():
            set_(name, parse_dtype(getattr(self, name), name, allowed, default))
        if type(self.blocksize) is not int or self.blocksize not in BLOCKSIZES:
            raise ConfigError(
                f"blocksize={self.blocksize!r} is not supported by bitsandbytes; use a power of two from "
                "32 to 4096 (64 is what transformers writes)"
            )

    @classmethod
    def coerce(cls, obj: Any) -> QuantConfig | None:
        """Any accepted description of a bitsandbytes config, as a QuantConfig.

        Args:
            obj: a QuantConfig, a transformers ``BitsAndBytesConfig``, an accelerate
                ``BnbQuantizationConfig``, a ``quantization_config`` dict from a config.json, or None.

        Returns:
            The QuantConfig, or None when ``obj`` is None (no quantization).
        """
        if obj is None or isinstance(obj, QuantConfig):
            return obj
        if isinstance(obj, dict):
            return cls.from_dict(obj)
        # A BitsAndBytesConfig or BnbQuantizationConfig exists only once its library is imported.
        tf = sys.modules.get("transformers.utils.quantization_config")
        if tf is not None and isinstance(obj, tf.BitsAndBytesConfig):
            return cls.from_bnb_config(obj)
        acc = sys.modules.get("accelerate.utils.dataclasses")
        if acc is not None and isinstance(obj, acc.BnbQuantizationConfig):
            return cls.from_accelerate_config(obj)
        raise ConfigError(
            f"cannot make a QuantConfig from {type(obj).__name__}; pass a QuantConfig, a transformers "
            "BitsAndBytesConfig, an accelerate BnbQuantizationConfig, a dict or None"
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Reads a ``quantization_config`` dict as transformers writes it into config.json.

        Args:
            d: the dict; ``quant_method`` must be ``"bitsandbytes"`` if present, ``_load_in_4bit`` and
                ``_load_in_8bit`` stand in for ``load_in_4bit``/``load_in_8bit`` when those are
                missing, a ``"fastq"`` sub-dict holds the fields transformers does not know. Other
                keys are ignored, as transformers does.

        Returns:
            The QuantConfig.
        """
        d = dict(d)
        method = d.pop("quant_method", QUANT_METHOD)
        if str(getattr(method, "value", method)) != QUANT_METHOD:
            raise ConfigError(f"quant_method is {method!r}; fastq reads only 'bitsandbytes' configs")
        for bits in ("load_in_4bit", "load_in_8bit"):
            private = d.pop("_" + bits, None)
            if bits not in d and private is not None:
                d[bits] = private
            elif private is not None and private != d[bits]:
                raise ConfigError(f"{bits}={d[bits]!r} but _{bits}={private!r}; make them agree")
        if not isinstance(extra := d.pop("fastq", None) or {}, dict):
            raise ConfigError(f"the 'fastq' entry must be a dict of {', '.join(_EXTRA_FIELDS)}: {extra!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in {**d, **extra}.items() if k in names}
        if ignored := sorted(set(d) - names):
            _log.debug("QuantConfig.from_dict ignores %s", ignored)
        return cls(**kwargs)

    @classmethod
    def from_bnb_config(cls, cfg: Any) -> QuantConfig:
        """Reads a transformers ``BitsAndBytesConfig``.

        Args:
            cfg: the BitsAndBytesConfig.

        Returns:
            A QuantConfig with its fields.
        """
        return cls(**{f: getattr(cfg, f) for f in _BNB_FIELDS})

    @classmethod
    def from_accelerate_config(cls, cfg: Any) -> QuantConfig:
        """Reads an accelerate ``BnbQuantizationConfig``, keeping its values, defaults included (float16
        compute; ``torch_dtype`` float16 for 8-bit, the compute dtype for 4-bit).

        Args:
            cfg: the BnbQuantizationConfig.

        Returns:
            A QuantConfig with its fields.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in names})

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json: ``to_bnb_config().to_dict()``, with
        ``quant_method`` as a plain string, plus a ``"fastq"`` sub-dict holding ``skip_modules``,
        ``keep_in_fp32_modules``, ``torch_dtype`` and ``blocksize`` where they are not the default
        (transformers ignores it). With ``skip_modules`` set, the sub-dict also keeps the unmerged
        ``llm_int8_skip_modules``.

        Returns:
            A JSON-serializable dict that ``from_dict`` reads back to an equal QuantConfig.
        """
        out: dict[str, Any] = {
            "quant_method": QUANT_METHOD,
            "_load_in_8bit": self.load_in_8bit,
            "_load_in_4bit": self.load_in_4bit,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": self._bnb_skip_modules(),
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": _dtype_name(self.compute_dtype),
            "bnb_4bit_quant_storage": _dtype_name(self.quant_storage),
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
        }
        extra = {}
        for name in _EXTRA_FIELDS:
            value = getattr(self, name)
            if value != _DEFAULTS[name]:
                extra[name] = _dtype_name(value) if isinstance(value, torch.dtype) else value
        if self.skip_modules is not None:  # folded into llm_int8_skip_modules above; keep the original
            extra["llm_int8_skip_modules"] = self.llm_int8_skip_modules
        if extra:
            out["fastq"] = extra
        return out

    def to_bnb_config(self) -> Any:
        """A transformers ``BitsAndBytesConfig`` with the same settings. ``skip_modules`` is merged
        into ``llm_int8_skip_modules`` (transformers has one skip list); ``keep_in_fp32_modules``,
        ``torch_dtype`` and ``blocksize`` have no place in it.

        Returns:
            The BitsAndBytesConfig.
        """
        from transformers import BitsAndBytesConfig

        kwargs = {f: getattr(self, f) for f in _BNB_FIELDS}
        kwargs["llm_int8_skip_modules"] = self._bnb_skip_modules()
        return BitsAndBytesConfig(**kwargs)

    def to_accelerate_config(self) -> Any:
        """An accelerate ``BnbQuantizationConfig`` with the same settings; the skip lists are merged.

        Returns:
            The BnbQuantizationConfig.

        Raises:
            ConfigError: a setting accelerate cannot express applies (4-bit with a storage other than
                uint8 or a block size other than 64; 8-bit with ``llm_int8_has_fp16_weight``).
        """
        from accelerate.utils import BnbQuantizationConfig

        lost = {
            "bnb_4bit_quant_storage": self.quant_storage != torch.uint8,
            "blocksize": self.blocksize != 64,
        }
        lost = lost if self.is_4bit else {"llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight}
        if bad := [name for name, is_set in lost.items() if is_set]:
            msg = "leave them at their defaults or use to_bnb_config()"
            raise ConfigError(f"accelerate's BnbQuantizationConfig cannot express {', '.join(bad)}; {msg}")
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(BnbQuantizationConfig)}
        kwargs["skip_modules"] = self._bnb_skip_modules()  # fresh lists: accelerate extends them
        kwargs["keep_in_fp32_modules"] = _module_list(self.keep_in_fp32_modules, "keep_in_fp32_modules")
        with warnings.catch_warnings():  # accelerate warns on any 4-bit threshold other than 6.0
            warnings.filterwarnings("ignore", message="llm_int8_threshold can only be used")
            return BnbQuantizationConfig(**kwargs)

    def _bnb_skip_modules(self) -> list[str] | None:
        if self.llm_int8_skip_modules is None and self.skip_modules is None:
            return None
        return _merge(self.llm_int8_skip_modules, self.skip_modules)

    @property
    def is_4bit(self) -> bool:
        return self.load_in_4bit

    @property
    def is_8bit(self) -> bool:
        return self.load_in_8bit

    @property
    def quant_method(self) -> str:
        """``"bitsandbytes"``, as transformers' ``quant_method`` attribute."""
        return QUANT_METHOD

    def quantization_method(self) -> str:
        """``"llm_int8"``, ``"nf4"`` or ``"fp4"``, as transformers' ``quantization_method()``."""
        return "llm_int8" if self.is_8bit else self.bnb_4bit_quant_type

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.bnb_4bit_compute_dtype  # type: ignore[return-value]  # a dtype after __post_init__

    @property
    def quant_storage(self) -> torch.dtype:
        return self.bnb_4bit_quant_storage  # type: ignore[return-value]

    @property
    def modules_to_not_convert(self) -> list[str]:
        """``llm_int8_skip_modules`` + ``skip_modules`` + ``keep_in_fp32_modules``, deduplicated in
        order: what both transformers and accelerate leave unquantized besides the default skips
        (see ``default_skips``)."""
        return _merge(self.llm_int8_skip_modules, self.skip_modules, self.keep_in_fp32_modules)

    @property
    def default_skips(self) -> bool:
        """Whether the default skips (tied weights, output head) apply: no skip list was given."""
        return self.llm_int8_skip_modules is None and self.skip_modules is None

    @property
    def spec(self) -> Spec4bit | str:
        """What ``Checkpoint.quantize`` takes: a ``Spec4bit`` for 4-bit, ``"int8"`` for 8-bit."""
        if self.is_8bit:
            return SPEC_INT8
        qt, double = self.bnb_4bit_quant_type, self.bnb_4bit_use_double_quant
        return Spec4bit(
            quant_type=qt, blocksize=self.blocksize, double_quant=double, quant_storage=self.quant_storage
        )

    def __hash__(self) -> int:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return hash(tuple(tuple(v) if isinstance(v, list) else v for v in values))

    def __repr__(self) -> str:
        parts = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != _DEFAULTS[f.name]
        ]
        return f"QuantConfig({', '.join(parts)})"


_BNB_FIELDS = tuple(f.name for f in dataclasses.fields(QuantConfig) if f.name not in _EXTRA_FIELDS)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(QuantConfig)}
_DEFAULTS.update({name: default for name, (_, default) in _DTYPE_FIELDS.items()})
_BOOL_FIELDS = [f.name for f in dataclasses.fields(QuantConfig) if f.type == "bool"]
_LIST_FIELDS = [f.name for f in dataclasses.fields(QuantConfig) if f.type.startswith("list")]
