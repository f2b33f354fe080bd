"""Which tensor goes where: the plan shared by ``fastq.load`` and ``fastq convert``.

Given a model skeleton whose ``nn.Linear`` layers were already swapped for bitsandbytes modules (by
transformers' own ``replace_with_bnb_linear``, so the choice of modules is transformers'), the plan
maps every parameter of the model to its source in the checkpoint and says how to produce it:
quantize (4-bit / int8), read pre-quantized bytes, or copy as is.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch

from .bnb_format import QUANT_STATE, QUANT_STATE_SUFFIXES, SCB, WEIGHT_FORMAT, quant_state_owner
from .checkpoint import Checkpoint
from .errors import FastqError, ShapeError
from .key_mapping import Sources, checkpoint_sources
from .prequantized import check_prequantized_4bit, check_prequantized_int8

__all__ = ["Entry", "Plan", "check_complete", "make_plan", "report_unused", "warn_non_finite"]

_log = logging.getLogger("fastq")


@dataclass
class Entry:
    """One parameter of the model and where it comes from.

    kind: "4bit" / "int8" (quantize ``source``), "4bit-pre" / "int8-pre" (read packed tensors that
    start with ``source``), "plain" (copy ``source``), or "tied" (same tensor as ``tied_to``).
    dtype: for "plain", the dtype the tensor is converted to; for "4bit" / "int8", the dtype ``source``
    is cast to before it is quantized (None: quantized as stored) - transformers materializes a weight
    in the model's dtype and bitsandbytes quantizes that, so a float32 checkpoint loaded as bfloat16 is
    quantized from bfloat16 values (and its QuantState says bfloat16).
    """

    name: str
    module: str
    kind: str
    source: str | None = None
    transpose: bool = False
    dtype: torch.dtype | None = None
    nbytes: int = 0
    tied_to: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    #: For a tensor transformers assembles from several checkpoint tensors (fused MoE experts):
    #: ``(checkpoint tensor, byte offset, nbytes)`` of each piece (key_mapping.py); ``source`` is the first.
    pieces: tuple[tuple[str, int, int], ...] = ()
    #: The assembled tensor's shape (with ``pieces``).
    shape: tuple[int, ...] = ()
    #: The name ``save_pretrained`` writes it under when transformers renamed it on load (the
    #: checkpoint's, e.g. ``embed_out.weight`` for GPT-NeoX's ``lm_head.weight``); None: ``name``.
    saved_as: str | None = None


@dataclass
class Plan:
    entries: list[Entry]
    missing: list[str]
    unused: list[str]

    def by_kind(self, *kinds: str) -> list[Entry]:
        return [e for e in self.entries if e.kind in kinds]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def _candidates(name: str, prefix: str) -> list[str]:
    """Checkpoint names a model parameter may be stored under (with or without the base prefix)."""
    out = [name]
    if prefix:
        if name.startswith(prefix + "."):
            out.append(name[len(prefix) + 1 :])
        else:
            out.append(f"{prefix}.{name}")
    return out


def _alias_groups(model: torch.nn.Module) -> dict[str, str]:
    """For parameters shared under several names (tied weights): alias name -> first name."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in first:
            alias[name] = first[key]
        else:
            first[key] = name
    return alias


def _is_conv1d(module: torch.nn.Module) -> bool:
    src = getattr(module, "source_cls", None)
    return src is not None and src.__name__ == "Conv1D"


def make_plan(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    *,
    dtype_of: dict[str, torch.dtype] | None = None,
    quantize_fp16_weights: bool = True,
    quantize_dtype: torch.dtype | None = None,
) -> Plan:
    """Maps every parameter and persistent buffer of ``model`` to the checkpoint.

    Args:
        model: the skeleton (meta tensors), bitsandbytes modules already in place.
        ckpt: the opened checkpoint.
        dtype_of: target dtype per parameter name for unquantized tensors (default: the skeleton's).
        quantize_fp16_weights: False for ``llm_int8_has_fp16_weight`` (int8 modules keep 16-bit weights).
        quantize_dtype: the dtype weights are quantized from (the model's dtype); a weight stored in
            another dtype is cast first (``Entry.dtype``). None: quantize as stored.

    Returns:
        The plan; ``missing`` lists parameters found nowhere in the checkpoint (and not tied).
    """
    import bitsandbytes as bnb

    prefix = getattr(model, "base_model_prefix", "") or ""
    keys = set(ckpt.keys())
    # "<weight>.quant_state.bitsandbytes__nf4" keys by weight name (one pass, not one scan per module).
    quant_states: dict[str, list[str]] = {}
    for k in keys:
        head = quant_state_owner(k)
        if head is not None:
            quant_states.setdefault(head, []).append(k)
    alias = _alias_groups(model)
    dtype_of = dtype_of or {}
    entries: list[Entry] = []
    missing: list[str] = []
    used: set[str] = set()
    modules = dict(model.named_modules())

    def direct(name: str) -> str | None:
        return next((c for c in _candidates(name, prefix) if c in keys), None)

    state = model.state_dict(keep_vars=True)
    tensors = {n: t for n, t in state.items()}
    for name, p in model.named_parameters(remove_duplicate=False):
        tensors.setdefault(name, p)
    # transformers' conversion mapping only where a name does not match as it is (building transformers'
    # table of every family's mapping costs ~40 ms, most of a load's plan on a 7B checkpoint).
    matched = all(direct(n) is not None or n in alias for n, t in tensors.items() if isinstance(t, torch.nn.Parameter))
    sources = Sources() if matched else checkpoint_sources(model, ckpt)

    def find(name: str) -> str | None:
        if name in sources.renamed:
            return sources.renamed[name]
        return direct(name)
    for name, t in tensors.items():
        mod_name, _, leaf = name.rpartition(".")
        module = modules.get(mod_name)
        if name in alias:
            entries.append(Entry(name, mod_name, "tied", tied_to=alias[name]))
            continue
        merged = sources.merged.get(name)
        if merged is not None:
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                raise FastqError(f"{ckpt.path}: '{name}' is quantized by bitsandbytes and assembled by transformers "
                                 f"from {len(merged.pieces)} checkpoint tensors; fastq does not quantize assembled "
                                 "weights yet (skip the module with llm_int8_skip_modules)", path=ckpt.path, tensor=name)
            first = ckpt.meta(merged.pieces[0][0])
            _check_shape(name, t, first, merged.shape)
            dt = dtype_of.get(name) or _float_dtype(t)
            used.update(k for k, _, _ in merged.pieces)
            entries.append(Entry(name, mod_name, "plain", first.name, dtype=dt, nbytes=merged.nbytes,
                                 pieces=merged.pieces, shape=merged.shape))
            continue
        src = find(name)
        if src is None:
            # A tied weight saved under its alias (e.g. lm_head stored, embeddings not).
            twins = [a for a, f in alias.items() if f == name]
            src = next((find(a) for a in twins if find(a)), None)
        quantized = isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and leaf == "weight"
        if src is None:
            if name in sources.unsupported:
                raise FastqError(f"{ckpt.path}: transformers assembles '{name}' from several checkpoint tensors, "
                                 f"and {sources.unsupported[name]}", path=ckpt.path, tensor=name)
            if quantized or isinstance(t, torch.nn.Parameter):
                missing.append(name)
            continue
        used.add(src)
        meta = ckpt.meta(src)
        transpose = quantized and _is_conv1d(module)
        if quantized and isinstance(module, bnb.nn.Linear4bit):
            pre = quant_states.get(src, [])
            if pre:
                extra = {s: f"{src}.{s}" for s in QUANT_STATE_SUFFIXES if f"{src}.{s}" in keys}
                extra[QUANT_STATE] = pre[0]
                qs = check_prequantized_4bit(ckpt, src, extra)
                _check_shape(name, t, ckpt.meta(pre[0]), tuple(qs["shape"]))
                used.update(extra.values())
                entries.append(Entry(name, mod_name, "4bit-pre", src, nbytes=meta.nbytes, extra=extra))
            else:
                _check_shape(name, t, meta, meta.shape[::-1] if transpose else meta.shape)
                cast = _quantize_from(quantize_dtype, meta)
                entries.append(Entry(name, mod_name, "4bit", src, transpose, cast, nbytes=meta.nbytes))
            continue
        if quantized and isinstance(module, bnb.nn.Linear8bitLt):
            scb = next((c for c in (f"{mod_name}.{SCB}", f"{src}.{SCB}") if c in keys), None)
            if scb is None and src.endswith(".weight"):
                scb = src[: -len("weight")] + SCB if src[: -len("weight")] + SCB in keys else None
            if meta.dtype == "I8" and scb is not None:
                check_prequantized_int8(ckpt, src, scb)
                _check_shape(name, t, meta, meta.shape)
                extra = {SCB: scb}
                fmt = src[: -len("weight")] + WEIGHT_FORMAT
                if fmt in keys:
                    extra[WEIGHT_FORMAT] = fmt
                used.update(extra.values())
                entries.append(Entry(name, mod_name, "int8-pre", src, nbytes=meta.nbytes, extra=extra))
                continue
            _check_shape(name, t, meta, meta.shape[::-1] if transpose else meta.shape)
            if quantize_fp16_weights:
                cast = _quantize_from(quantize_dtype, meta)
                entries.append(Entry(name, mod_name, "int8", src, transpose, cast, nbytes=meta.nbytes))
            else:
                dt = dtype_of.get(name) or _float_dtype(t)
                entries.append(Entry(name, mod_name, "plain", src, transpose, dt, meta.nbytes))
            continue
        _check_shape(name, t, meta, meta.shape)
        dt = dtype_of.get(name) or _float_dtype(t) if meta.torch_dtype.is_floating_point else None
        entries.append(Entry(name, mod_name, "plain", src, dtype=dt, nbytes=meta.nbytes))
    for e in entries:
        if e.name in sources.renamed and e.source == sources.renamed[e.name]:
            e.saved_as = e.source
    # Keys transformers writes that a plan consumes implicitly.
    unused = sorted(k for k in keys - used if not k.endswith("." + WEIGHT_FORMAT))
    return Plan(entries, missing, unused)


def _quantize_from(target: torch.dtype | None, meta) -> torch.dtype | None:
    """The dtype a weight is cast to before quantizing: the model's dtype for it, where that is not the
    stored one (transformers, core_model_loading.py: a param that needs quantization is materialized in
    ``dtype``; accelerate casts to the empty parameter's dtype or ``torch_dtype``)."""
    if target is None or not target.is_floating_point or target == meta.torch_dtype:
        return None
    return target


def _check_shape(name: str, skeleton: torch.Tensor, meta, checkpoint_shape) -> None:
    """The model's parameter ``name`` must have the shape the checkpoint's tensor ``meta`` gives it
    (transformers refuses mismatched sizes too, unless ``ignore_mismatched_sizes``)."""
    if tuple(skeleton.shape) != tuple(checkpoint_shape):
        raise ShapeError(
            f"{meta.file}: tensor '{meta.name}' gives {name} the shape {list(checkpoint_shape)}, but the model "
            f"built from the config expects {list(skeleton.shape)}. Does config.json match these weights?",
            path=meta.file, tensor=meta.name,
        )


def _float_dtype(t: torch.Tensor) -> torch.dtype | None:
    return t.dtype if t.dtype.is_floating_point else None


def check_complete(plan: Plan, where: str) -> None:
    """Raises if the checkpoint lacks parameters the model needs."""
    if plan.missing:
        shown = ", ".join(plan.missing[:8]) + (" ..." if len(plan.missing) > 8 else "")
        raise FastqError(
            f"{where}: the checkpoint has no tensor for {len(plan.missing)} parameter(s) of the model: {shown}. "
            "Is this the right checkpoint for this architecture?",
            path=where, tensor=plan.missing[0],
        )


def report_unused(plan: Plan, where: str) -> None:
    """Logs the checkpoint tensors no parameter of the model uses, as transformers does (a warning on its
    logger, "Some weights of the model checkpoint ... were not used"), on the ``fastq`` logger."""
    if plan.unused:
        shown = ", ".join(plan.unused[:8]) + (" ..." if len(plan.unused) > 8 else "")
        _log.warning("%s: %d checkpoint tensor(s) are not used by the model: %s", where, len(plan.unused), shown)


def warn_non_finite(ckpt: Checkpoint, plan: Plan) -> list[str]:
    """Warns about unquantized 1-D weights (norms, biases) that hold NaN or infinity in the checkpoint,
    naming each tensor and its file: transformers and bitsandbytes load them as they are, and every
    output of the model is then NaN. Read on the host from the checkpoint (a few KiB each), before any
    device sees them. (Quantized weights are checked by the quantizer: ``fastq.NonFiniteError``.)

    Returns:
        The checkpoint names of the tensors that hold a non-finite value.
    """
    bad = []
    for e in plan.by_kind("plain"):
        meta = ckpt.meta(e.source)
        one_d_float = len(meta.shape) == 1 and meta.torch_dtype.is_floating_point and meta.nbytes
        if one_d_float and not bool(ckpt.get(e.source).isfinite().all()):
            bad.append(e.source)
    if bad:
        shown = ", ".join(f"{n} ({ckpt.meta(n).file})" for n in bad[:4])
        warnings.warn(
            f"{len(bad)} weight(s) hold NaN or infinity: {shown}. transformers and bitsandbytes load them as "
            "they are, and the model's outputs will be NaN",
            stacklevel=4,
        )
    return bad
