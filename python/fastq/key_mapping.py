"""Which checkpoint tensors make each model tensor: transformers' own conversion mapping, applied to the
checkpoint's names without reading a byte.

transformers 5 renames checkpoint tensors on load (``embed_out`` -> ``lm_head`` for GPT-NeoX,
``block_sparse_moe`` -> ``mlp`` for Mixtral, ``LayerNorm.gamma`` -> ``LayerNorm.weight`` everywhere) and
merges some (a MoE layer's per-expert ``gate_proj`` / ``up_proj`` / ``down_proj`` into fused 3-D
``experts.gate_up_proj`` / ``experts.down_proj``), from ``conversion_mapping.py``; ``save_pretrained``
reverses it, so checkpoints keep the old names. This module asks the installed transformers for the
model's mapping (``get_model_conversion_mapping``) and matches names with its own
``rename_source_key``, in its order, so fastq follows whatever that version defines; there is no table
of fastq's own per family. A merge becomes a list of (checkpoint tensor, byte offset) pieces that the
Rust readers write into one destination buffer: stacking along a new first dimension
(``MergeModulelist(dim=0)``), then concatenating along the next (``Concatenate(dim=1)``), or
concatenating along the first. Other operations are refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint
from .errors import FastqError

__all__ = ["Merged", "Sources", "checkpoint_sources"]


@dataclass(frozen=True)
class Merged:
    """A model tensor assembled from several checkpoint tensors: each piece ``(tensor, offset, nbytes)``
    is a whole checkpoint tensor written at a byte offset of the destination (row-major, in the
    pieces' common dtype, the first piece's)."""

    pieces: tuple[tuple[str, int, int], ...]
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self.pieces)


@dataclass
class Sources:
    """Model tensor name -> checkpoint name where transformers renames it, and -> ``Merged`` where it
    merges several; ``unsupported`` names the merges fastq cannot assemble (model tensor -> why)."""

    renamed: dict[str, str] = field(default_factory=dict)
    merged: dict[str, Merged] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)


def _mapping(model):
    """transformers' renamings and converters for ``model`` (None before transformers 5)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return None
    try:
        transforms = get_model_conversion_mapping(model, add_legacy=True)
    except Exception:  # noqa: BLE001 - a model transformers has no mapping for: names stay as they are
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def checkpoint_sources(model: torch.nn.Module, ckpt: Checkpoint) -> Sources:
    """Matches every checkpoint tensor to the model tensor transformers would load it into.

    Args:
        model: the skeleton (meta tensors) transformers built.
        ckpt: the opened checkpoint.

    Returns:
        The renamed and merged tensors (tensors whose names match as they are are not listed).
    """
    out = Sources()
    mapping = _mapping(model)
    if mapping is None:
        return out
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    renamings, converters = mapping
    if not renamings and not converters:
        return out
    meta = dict(model.state_dict(keep_vars=True))
    for n, p in model.named_parameters(remove_duplicate=False):
        meta.setdefault(n, p)
    prefix = getattr(model, "base_model_prefix", None) or None
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    collected: dict[str, tuple[object, dict[str, list[str]]]] = {}
    for key in sorted(ckpt.keys(), key=dot_natural_key):
        try:
            target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        except TypeError as e:  # a transformers whose matcher takes other arguments than 5.24's
            raise FastqError(
                f"transformers {_version()}'s rename_source_key is not the one fastq calls ({e}); "
                "please report it with your transformers version"
            ) from e
        if target not in meta and key in meta:
            target, pattern = key, None
        if target not in meta:
            continue
        if pattern is None:
            if target != key:
                out.renamed.setdefault(target, key)
            continue
        conv, lists = collected.setdefault(target, (by_pattern[pattern], {}))
        lists.setdefault(pattern, []).append(key)
    for target, (conv, lists) in collected.items():
        try:
            out.merged[target] = _assemble(ckpt, conv, lists)
        except _Unsupported as e:
            out.unsupported[target] = str(e)
    return out


def _version() -> str:
    import transformers

    return transformers.__version__


class _Unsupported(Exception):
    pass


def _assemble(ckpt: Checkpoint, conv, lists: dict[str, list[str]]) -> Merged:
    """The pieces of one merge, for the operations fastq writes as byte gathers."""
    ops = [type(op).__name__ for op in conv.operations]
    dims = [getattr(op, "dim", None) for op in conv.operations]
    groups = [lists.get(p, []) for p in conv.source_patterns]
    if any(not g for g in groups):
        missing = [p for p, g in zip(conv.source_patterns, groups, strict=True) if not g]
        raise _Unsupported(f"the checkpoint has no tensor for {missing}")
    metas = [[ckpt.meta(k) for k in g] for g in groups]
    dtypes = {m.dtype for g in metas for m in g}
    if len(dtypes) != 1:
        raise _Unsupported(f"its pieces have several dtypes {sorted(dtypes)}")
    item = metas[0][0].nbytes // max(1, math.prod(metas[0][0].shape))
    pieces = []

    def put(m, at: int) -> int:
        pieces.append((m.name, at, m.nbytes))
        return at + m.nbytes

    if ops == ["MergeModulelist"] and dims == [0] and len(groups) == 1:
        shapes = {m.shape for m in metas[0]}
        if len(shapes) != 1:
            raise _Unsupported("its experts have different shapes")
        at = 0
        for m in metas[0]:
            at = put(m, at)
        shape = (len(metas[0]), *metas[0][0].shape)
    elif ops == ["MergeModulelist", "Concatenate"] and dims == [0, 1]:
        n = {len(g) for g in metas}
        tails = {m.shape[1:] for g in metas for m in g}
        if len(n) != 1 or len(tails) != 1 or any(len({m.shape for m in g}) != 1 for g in metas):
            raise _Unsupported("its groups do not stack")
        at = 0
        for e in range(n.pop()):
            for g in metas:
                at = put(g[e], at)
        shape = (len(metas[0]), sum(g[0].shape[0] for g in metas), *tails.pop())
    elif ops == ["Concatenate"] and dims == [0] and all(len(g) == 1 for g in metas):
        tails = {g[0].shape[1:] for g in metas}
        if len(tails) != 1:
            raise _Unsupported("its pieces do not concatenate")
        at = 0
        for g in metas:
            at = put(g[0], at)
        shape = (sum(g[0].shape[0] for g in metas), *tails.pop())
    else:
        raise _Unsupported(f"operations {ops} with dims {dims} are not byte gathers fastq writes yet")
    assert at == item * math.prod(shape)
    return Merged(tuple(pieces), tuple(shape))

