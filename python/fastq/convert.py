"""``fastq.convert``: a checkpoint quantized once, on the CPU, into the checkpoint transformers writes for a
bitsandbytes model (``from_pretrained(..., quantization_config=...)`` then ``save_pretrained``).

The model is never built in memory: the skeleton is made on the meta device and planned by the same
code as ``fastq.load`` (``loader.prepare``), so exactly the tensors ``load`` quantizes are quantized. The
Rust writer streams the quantization results into sharded safetensors with the GIL released.

Atomic and resumable: everything is written into ``.<DST>.fastq-tmp`` beside DST and renamed into place
only when complete; ``fastq-manifest.json`` there records each finished shard's checksum (SHA-256 of the
SHA-256s of its 16 MiB chunks, ``fastq.inspect.shard_digest``), and ``resume=True`` keeps the shards that still
match it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _fastq
from .atomic import clear, commit, lock_temp_folder, remove_unless_locked, temp_folder, writing
from .bnb_format import QUANT_STATE, QUANT_STATE_SUFFIXES, SCB, WEIGHT_FORMAT, quant_state_key
from .config import QuantConfig
from .dtypes import st_name as _st
from .errors import ConfigError, OutputExistsError
from .progress import byte_bar

__all__ = ["Outputs", "convert", "parse_size", "plan_outputs"]

#: Extensions of weight files that are not copied beside the converted shards.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
_NOT_COPIED = {"config.json", "generation_config.json", "fastq-manifest.json", "model.safetensors.index.json"}

def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000, as huggingface_hub's ``parse_size_to_int`` (decimal units KB..TB;
    ``"5GiB"`` style binary units are accepted too). An int is returned as is.

    Args:
        size: bytes, or a number followed by a unit.

    Returns:
        The size in bytes.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ConfigError(f"max_shard_size must be positive, got {size}")
        return size
    s = str(size).strip().upper() if isinstance(size, str) else ""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                value = float(s[: -len(unit)].strip())
            except ValueError:
                break
            # inf, nan and sizes under one byte are no sizes (int() of the first two raises)
            if not math.isfinite(value) or value * mult < 1:
                break
            return int(value * mult)
    if s.isdigit() and int(s) > 0:
        return int(s)
    raise ConfigError(f"max_shard_size={size!r} is not a size; write e.g. 5GB, 500MB or a number of bytes")


@dataclass
class Outputs:
    """What the Rust writer is asked to write, in state-dict order (see ``_fastq.convert``)."""

    jobs: list[_fastq.Job]
    outputs: list[_fastq.Output]
    #: ``model.num_parameters()`` of the quantized model (the index's ``metadata.total_parameters``).
    total_parameters: int
    #: The dtype transformers records in config.json (``model.dtype``: the first floating parameter's).
    config_dtype: torch.dtype


def plan_outputs(prepared) -> Outputs:
    """Every tensor transformers' ``save_pretrained`` would write for the model ``prepared`` describes,
    in its state-dict order, as jobs and outputs for the Rust writer.

    Args:
        prepared: ``loader.prepare(...)`` of a checkpoint that is not quantized yet.

    Returns:
        The ``Outputs``.
    """
    model, plan, qcfg, ckpt = prepared.model, prepared.plan, prepared.qcfg, prepared.ckpt
    by_name = {e.name: e for e in plan.entries}
    params = dict(model.named_parameters())
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or [])
    state = model.state_dict(keep_vars=True)
    names = [n for n in state if n not in ignore] + [n for n in by_name if n not in state]
    jobs: list[_fastq.Job] = []
    # (the model's name it sorts by, output): save_pretrained orders by the model's names, then renames
    outputs: list[tuple[str, _fastq.Output]] = []
    extras: tuple[str, list[tuple[str, _fastq.Output]]] | None = None
    total_parameters = 0
    config_dtype = None

    def first_float(dt: torch.dtype, name: str) -> None:
        nonlocal config_dtype
        if config_dtype is None and name in params and dt.is_floating_point:
            config_dtype = dt

    for name in names:
        e = by_name.get(name)
        module = e.module if e is not None else name.rpartition(".")[0]
        if extras is not None and module != extras[0]:
            outputs.extend(extras[1])
            extras = None
        if e is None:
            t = state.get(name)
            if t is not None and t.device.type != "meta" and name not in params:  # a buffer made at init
                data = t.detach().contiguous().cpu()
                raw = data.reshape(-1).view(torch.uint8).numpy()
                outputs.append((name, _fastq.Output.inline(name, _st(data.dtype), list(data.shape), raw)))
            continue
        if e.kind == "tied":
            continue
        if e.kind in ("4bit-pre", "int8-pre"):
            raise ConfigError(f"{prepared.source.path} is already quantized ({e.name}); there is nothing to convert")
        meta = ckpt.meta(e.source)
        numel = math.prod(meta.shape)
        # save_pretrained reverses transformers' renames and merges: the checkpoint's names come back
        saved = e.saved_as or e.name
        if e.kind == "plain":
            dt = e.dtype if e.dtype is not None else meta.torch_dtype
            cast = _st(dt) if _st(dt) != meta.dtype else None
            if e.pieces:  # fused MoE experts: saved as the per-expert tensors they were read from
                outputs.extend((e.name, _fastq.Output.copy(src, src, False, cast)) for src, _, _ in e.pieces)
                numel = sum(math.prod(ckpt.meta(src).shape) for src, _, _ in e.pieces)
            else:
                outputs.append((e.name, _fastq.Output.copy(saved, e.source, e.transpose, cast)))
            first_float(dt, e.name)
            total_parameters += numel if e.name in params else 0
            continue
        j = len(jobs)
        # The plan says which dtype a weight is quantized from (transformers casts to the model's first).
        cast = _st(e.dtype) if e.dtype is not None and _st(e.dtype) != meta.dtype else None
        outputs.append((e.name, _fastq.Output.part(saved, j, "weight")))
        if e.kind == "4bit":
            qt, dq = qcfg.bnb_4bit_quant_type, qcfg.bnb_4bit_use_double_quant
            jobs.append(_fastq.Job.four_bit(
                e.source, qt, qcfg.blocksize, dq, transpose=e.transpose, cast=cast, storage=_st(qcfg.quant_storage)
            ))
            stats = QUANT_STATE_SUFFIXES if dq else QUANT_STATE_SUFFIXES[:2]
            rest = [(f"{e.name}.{p}", _fastq.Output.part(f"{saved}.{p}", j, p)) for p in stats]
            qs = quant_state_key(qt)
            rest.append((f"{e.name}.{qs}", _fastq.Output.part(f"{saved}.{qs}", j, QUANT_STATE)))
            first_float(qcfg.quant_storage, e.name)
            # transformers counts a 4-bit weight as numel(packed) * 2 * element_size (num_parameters)
            total_parameters += (numel + 1) // 2 * 2
        elif e.kind == "int8":
            jobs.append(_fastq.Job.int8(e.source, transpose=e.transpose, cast=cast))
            owner = saved.rpartition(".")[0]
            prefix = f"{owner}." if owner else ""
            model_prefix = f"{e.module}." if e.module else ""
            rest = [(f"{model_prefix}{p}", _fastq.Output.part(f"{prefix}{p}", j, p)) for p in (SCB, WEIGHT_FORMAT)]
            total_parameters += numel
        else:
            raise ConfigError(f"unexpected plan entry {e.kind!r} for {e.name}")
        extras = (e.module, rest)
    if extras is not None:
        outputs.extend(extras[1])
    key = _save_order_key()
    if key is not None:
        outputs.sort(key=lambda o: key(o[0]))
    return Outputs(jobs, [o for _, o in outputs], total_parameters, config_dtype or prepared.dtype)


def _save_order_key():
    """The order ``save_pretrained`` hands tensors to the shard split. transformers 5 passes a model loaded
    by ``from_pretrained`` through ``revert_weight_conversion``, which sorts the state dict by
    ``dot_natural_key`` (core_model_loading.py); without it (transformers 4) the state-dict order stays."""
    try:
        from transformers.core_model_loading import dot_natural_key
    except ImportError:
        return None
    return dot_natural_key


def _source_fingerprint(ckpt) -> list:
    out = []
    for p in ckpt.shard_paths:
        st = os.stat(p)
        out.append([os.path.basename(p), st.st_size, st.st_mtime_ns])
    return out


def _progress_bar(enabled: bool, desc: str):
    """A progress callback for the Rust writer (bytes read, rate and time left: ``progress.byte_bar``)."""
    state = {"bar": None}

    def update(done: int, total: int, shards_done: int, shards_total: int, resumed: int) -> None:
        if not enabled:
            return
        bar = state["bar"]
        if bar is None:
            if resumed:
                print(f"fastq convert: resuming, {resumed} of {shards_total} shard(s) verified and kept", file=sys.stderr)
            bar = state["bar"] = byte_bar(total, desc, unit_divisor=1024)
        bar.n = done
        bar.set_postfix_str(f"shards {shards_done}/{shards_total}", refresh=False)
        bar.refresh()

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    return update, close


def _quantization_config(prepared, qcfg: QuantConfig) -> dict:
    """``qcfg.to_dict()``, transformers' ``BitsAndBytesConfig.to_dict()``. accelerate's
    ``keep_in_fp32_modules`` has no place there, so transformers would build those modules as 4-bit/8-bit
    layers and fail to load their float32 weights; with it, ``llm_int8_skip_modules`` lists every module
    the conversion left unquantized (transformers' own ``modules_to_not_convert``), and the "fastq"
    sub-dict keeps the rest for ``fastq.load``."""
    d = qcfg.to_dict()
    hfq = prepared.hf_quantizer
    if qcfg.keep_in_fp32_modules and hfq is not None and getattr(hfq, "modules_to_not_convert", None):
        d["llm_int8_skip_modules"] = sorted(set(hfq.modules_to_not_convert))
    return d


def _write_side_files(prepared, tmp: Path, outputs: Outputs, qcfg: QuantConfig) -> None:
    """config.json and generation_config.json as ``save_pretrained`` writes them; the tokenizer and every
    other non-weight file of the source copied as they are."""
    import copy

    model = prepared.model
    config = copy.deepcopy(model.config)
    config.quantization_config = _quantization_config(prepared, qcfg)
    config.dtype = str(outputs.config_dtype).removeprefix("torch.")
    config.architectures = [model.__class__.__name__]
    with writing(tmp / "config.json"):
        config.save_pretrained(tmp)
    src_folder = prepared.source.folder
    if hasattr(model, "can_generate") and model.can_generate():
        from transformers import GenerationConfig

        # as from_pretrained does (generation/utils.py, adjust_generation_fn)
        try:
            gen = GenerationConfig.from_pretrained(src_folder, local_files_only=True)
        except OSError:
            gen = GenerationConfig.from_pretrained(
                src_folder, config_file_name="config.json", _from_model_config=True, local_files_only=True
            )
        with writing(tmp / "generation_config.json"):
            gen.save_pretrained(tmp)
    for p in sorted(src_folder.iterdir()):
        if (
            p.is_file()
            and not p.name.startswith(".")
            and p.name not in _NOT_COPIED
            and not p.name.endswith(_WEIGHT_SUFFIXES)
            and not p.name.endswith(".index.json")
        ):
            with writing(tmp / p.name):
                shutil.copy2(p, tmp / p.name)


def _write_index(tmp: Path, result: dict, total_parameters: int) -> None:
    """model.safetensors.index.json exactly as ``save_pretrained`` writes it (several shards only)."""
    shards = result["shards"]
    if len(shards) < 2:
        return
    weight_map = {t: s["name"] for s in shards for t in s["tensors"]}
    index = {
        "metadata": {"total_parameters": total_parameters, "total_size": result["total_size"]},
        "weight_map": weight_map,
    }
    path = tmp / "model.safetensors.index.json"
    with writing(path):
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    cfg,
    *,
    max_shard_size: int | str = "5GB",
    threads: int | None = None,
    resume: bool = False,
    progress: bool = True,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    fsync: bool = True,
    trust_remote_code: bool = False,
) -> Path:
    """Quantizes the checkpoint in ``src`` into ``dst``, in the format transformers saves for a bitsandbytes
    model: ``transformers.AutoModel*.from_pretrained(dst)`` loads it with no extra argument, and
    ``fastq.load(dst)`` at disk speed.

    Args:
        src: a folder with config.json and safetensors (sharded or not).
        dst: the output folder; it must not exist unless ``overwrite``.
        cfg: the quantization: ``fastq.QuantConfig``, ``BitsAndBytesConfig``, ``BnbQuantizationConfig`` or
            a dict.
        max_shard_size: largest shard, as ``save_pretrained``'s (``"5GB"``, ``"500MB"`` or bytes).
        threads: quantization threads (default: ``FASTQ_NUM_THREADS`` or every core).
        resume: continue an interrupted conversion into the same ``dst``, keeping the shards whose
            checksum still matches the manifest.
        progress: show a progress bar (bytes read, rate, time left).
        dtype: dtype of the unquantized tensors and of the weights before quantization (default: the
            config's, as ``from_pretrained`` picks on transformers 5).
        overwrite: replace an existing ``dst`` (atomically, once the new one is complete).
        fsync: sync every file before the final rename, so a power cut cannot leave a partial ``dst``.
        trust_remote_code: passed to transformers when building the skeleton.

    Returns:
        The path of the converted checkpoint.

    Raises:
        OutputExistsError: ``dst`` exists and ``overwrite`` is False.
        FastqIOError: a file cannot be read or written (a full disk, a read-only folder), naming it. A
            failure while writing the shards keeps the finished ones for ``resume``; one after them
            (config.json, the tokenizer files, the index, the final rename) leaves nothing behind.
        ConfigError: an invalid config, or a source that cannot be converted.
    """
    from .loader import prepare

    qcfg = QuantConfig.coerce(cfg)
    if qcfg is None:
        raise ConfigError("fastq.convert needs a quantization config (load_in_4bit or load_in_8bit)")
    if qcfg.quantize_experts:
        raise ConfigError(
            "quantize_experts has no checkpoint format transformers or bitsandbytes read yet (bitsandbytes PR "
            "#1965 is open): convert without it, and pass quantize_experts=True to fastq.load instead"
        )
    src, dst = Path(src), Path(dst).absolute()
    limit = parse_size(max_shard_size)
    if os.path.lexists(dst) and not overwrite:  # a dangling link too: commit would find it
        raise OutputExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
    if src.exists() and dst.exists() and dst.resolve() == src.resolve():
        raise ConfigError(f"{dst} is the source itself; convert into another folder")
    if src.exists() and dst.is_dir() and dst.resolve() in src.resolve().parents:
        raise ConfigError(f"{dst} holds the source {src}; replacing it would delete it: convert into another folder")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ConfigError(f"threads={threads!r}: pass a number of threads (1 or more), or None for every core")
    prepared = prepare(src, qcfg, dtype=dtype, trust_remote_code=trust_remote_code)
    if prepared.prequantized:
        raise ConfigError(f"{src} is already quantized (its config.json has a quantization_config)")
    outputs = plan_outputs(prepared)
    params = {
        "source": os.fspath(Path(prepared.ckpt.path).resolve()),
        "source_files": _source_fingerprint(prepared.ckpt),
        "quantization_config": qcfg.to_dict(),
        "dtype": str(prepared.dtype).removeprefix("torch."),
        "max_shard_size": limit,
    }
    tmp = temp_folder(dst)
    lock = lock_temp_folder(dst)
    update, close_bar = _progress_bar(progress, "fastq convert")
    committed = False
    # Once every shard is written, a failure (a full disk, a folder that turned read-only) leaves no
    # temporary folder behind: its space is what the disk lacks. An interruption keeps the shards for
    # --resume, and so does a failure while writing them (the writer's manifest records each one).
    discard = False
    try:
        if not resume:
            with writing(tmp, "cannot clear it"):
                clear(tmp)
        try:
            result = _fastq.convert(
                prepared.ckpt.path, os.fspath(tmp), outputs.jobs, outputs.outputs, limit,
                json.dumps(params, sort_keys=True), resume, fsync, threads, update,
            )
        finally:
            close_bar()
        discard = True
        _write_index(tmp, result, outputs.total_parameters)
        _write_side_files(prepared, tmp, outputs, qcfg)
        lock.release(remove=True)
        commit(tmp, dst, overwrite, fsync)
        committed = True
    except KeyboardInterrupt:
        discard = False
        print(f"fastq convert: interrupted; finished shards are kept in {tmp} (run again with --resume)", file=sys.stderr)
        raise
    except OutputExistsError:
        discard = False  # the finished result stays in tmp, as the error says
        raise
    finally:
        lock.release()
        if not committed:
            if discard:
                remove_unless_locked(tmp)
            else:
                _drop_if_empty(tmp)
    return dst


def _drop_if_empty(tmp: Path) -> None:
    """Removes a temporary folder that holds no finished shard (nothing a resume could keep)."""
    manifest = tmp / "fastq-manifest.json"
    try:
        shards = json.loads(manifest.read_text()).get("shards", {}) if manifest.is_file() else {}
    except (OSError, ValueError):
        shards = {}
    if not shards and tmp.is_dir():
        remove_unless_locked(tmp)  # not while another run holds it
