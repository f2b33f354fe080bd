"""``fastq.save``: a model loaded by ``fastq.load`` (4-bit or 8-bit) saved in the checkpoint format
``fastq.convert`` writes, atomically.

For a transformers model this is ``save_pretrained`` itself (bitsandbytes' modules serialize their
packed weights and QuantState), written into a temporary sibling folder that is renamed into place when
complete. The one thing fastq adjusts is the order tensors reach the shard split: transformers 5 sorts the
state dict of a model that ``from_pretrained`` loaded (``revert_weight_conversion``, by
``dot_natural_key``) but not of one built another way, so ``save`` marks the model as loaded with no
weight conversion, and a fastq-loaded model is saved byte for byte as the same model loaded by
``from_pretrained``, and as ``fastq.convert`` writes it. Other models (accelerate's path) are saved with
``huggingface_hub.save_torch_state_dict`` (the same split and safetensors files, no config.json).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .atomic import commit, fsync_path, io_error, remove, temp_folder, writing
from .convert import parse_size
from .errors import OutputExistsError, UnsavableModelError

__all__ = ["save"]


def _check_not_repacked(model: torch.nn.Module) -> None:
    """bitsandbytes' CPU backend repacks a 4-bit weight for its gemm on the first forward pass and rounds
    its absmax to bfloat16, transposed (functional.py ``_convert_weight_packed_for_cpu``); the inverse its
    ``_save_to_state_dict`` runs restores the codes but not the absmax, so a checkpoint saved from such a
    model no longer matches its weights (bitsandbytes 0.50.2). Refuse rather than write it."""
    import bitsandbytes as bnb

    for name, m in model.named_modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        state = getattr(m.weight, "quant_state", None)
        if state is None:
            continue
        absmax = state.absmax
        if getattr(state, "packing_format_for_cpu", False) or absmax.dim() != 1 or absmax.dtype not in (
            torch.float32, torch.uint8
        ):
            raise UnsavableModelError(
                f"{name}: bitsandbytes repacked this 4-bit weight for its CPU kernel when the model ran "
                "(absmax rounded to bfloat16), so it can no longer be saved as it was quantized. Save the "
                "model before running it on the CPU, or load it again and save that."
            )


def save(
    model: torch.nn.Module,
    path: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    *,
    overwrite: bool = False,
    fsync: bool = True,
) -> Path:
    """Saves ``model`` (typically from ``fastq.load``) as sharded safetensors, atomically.

    Args:
        model: a model with bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers (or none).
        path: the output folder; it must not exist unless ``overwrite``.
        max_shard_size: largest shard (``"5GB"``, ``"500MB"`` or bytes), as ``save_pretrained``'s.
        overwrite: replace an existing folder (once the new one is complete).
        fsync: sync the files before the final rename.

    Returns:
        The output folder.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
        FastqIOError: a file cannot be written (a full disk, a read-only folder); nothing is left behind.
        UnsavableModelError: the model ran on the CPU, and bitsandbytes repacked its 4-bit weights lossily.
    """
    from transformers import PreTrainedModel

    dst = Path(path).absolute()
    limit = parse_size(max_shard_size)
    _check_not_repacked(model)
    from .experts import QuantizedExperts

    if any(isinstance(m, QuantizedExperts) for m in model.modules()):
        raise UnsavableModelError(
            "the model's MoE experts were quantized by fastq (quantize_experts), a layout no loader reads yet "
            "(bitsandbytes PR #1965 is open); load with quantize_experts=False to save it"
        )
    if os.path.lexists(dst) and not overwrite:  # a dangling link too: commit would find it
        raise OutputExistsError(f"{dst} exists; pass overwrite=True to replace it")
    tmp = temp_folder(dst)
    try:
        remove(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise io_error(tmp.parent, e, f"cannot create {tmp.name} here for {dst.name}") from e
    try:
        # transformers writes every file; an error without a file name (a full disk) names the folder
        with writing(tmp):
            if isinstance(model, PreTrainedModel):
                _save_pretrained(model, tmp, limit)
            else:
                from huggingface_hub import save_torch_state_dict

                save_torch_state_dict(model.state_dict(), tmp, max_shard_size=limit, metadata={"format": "pt"})
        if fsync:
            for p in tmp.iterdir():
                if p.is_file():
                    with writing(p, "cannot sync it"):
                        fsync_path(p)
        commit(tmp, dst, overwrite, fsync)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _save_pretrained(model, folder: Path, limit: int) -> None:
    missing = object()
    previous = getattr(model, "_weight_conversions", missing)
    if previous is missing:
        # As after from_pretrained of a checkpoint that needed no renaming (core_model_loading.py).
        model._weight_conversions = []
    try:
        model.save_pretrained(folder, max_shard_size=limit, safe_serialization=True)
    finally:
        if previous is missing:
            del model._weight_conversions
