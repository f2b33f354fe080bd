"""``fastq.load``: a checkpoint to a quantized model on its devices. Orchestration only:

1. resolve the source (folder with config.json, or one safetensors file) and the quantization config
   (given, or the checkpoint's own ``quantization_config`` when it is pre-quantized);
2. build the model empty (meta device) and let transformers' own quantizer swap ``nn.Linear`` for
   bitsandbytes modules, so the same modules come out as from ``from_pretrained``;
3. resolve the device map (device_map.py) and plan every tensor (plan.py);
4. start the Rust pipeline quantizing on all cores while this thread places the unquantized tensors,
   then install each packed result as it arrives (modules.py) - nothing is quantized twice;
5. tie weights, dispatch (hooks for offload), set the attributes transformers sets.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import device_map as dmap_mod
from . import transfer
from .bnb_format import QUANT_STATE, SCB, quant_state_stat
from .checkpoint import Checkpoint
from .config import QuantConfig
from .device_fill import cuda_device, fill_on_device
from .errors import ConfigError, MissingFileError
from .modules import get_submodule, prequantized_4bit, prequantized_int8, set_4bit, set_int8, set_plain
from .plan import Plan, check_complete, make_plan

__all__ = ["Prepared", "build_empty", "load", "load_and_quantize_model", "prepare"]


class Source:
    """Where the config and the weights are."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        if not p.exists():
            raise MissingFileError(f"{p}: no such file or folder")
        self.path = p
        self.folder = p if p.is_dir() else p.parent
        self.weights = p
        self.config_path = self.folder / "config.json" if (self.folder / "config.json").is_file() else None

    def raw_config(self) -> dict:
        return json.loads(self.config_path.read_text()) if self.config_path else {}


def _quant_config(cfg, raw_config: dict) -> tuple[QuantConfig | None, bool]:
    """The config to apply and whether the checkpoint is already quantized."""
    saved = raw_config.get("quantization_config")
    if saved and saved.get("quant_method", "bitsandbytes") == "bitsandbytes":
        saved_cfg = QuantConfig.coerce(saved)
        given = QuantConfig.coerce(cfg)
        if given is not None and given != saved_cfg:
            warnings.warn(
                "the checkpoint is already quantized; its own quantization_config is used and the one passed "
                "to fastq.load is ignored",
                UserWarning,
                stacklevel=3,
            )
        return saved_cfg, True
    return QuantConfig.coerce(cfg), False


def _transformers_default_dtype() -> str | None:
    """What ``from_pretrained`` does without ``dtype=``: transformers 5 reads config.json (``"auto"``),
    transformers 4 used torch's default dtype (modeling_utils.py, ``from_pretrained``: ``dtype = "auto"``)."""
    import transformers

    return "auto" if int(transformers.__version__.split(".")[0]) >= 5 else None


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
    if dtype is None:
        dtype = _transformers_default_dtype()
    if dtype == "auto":
        name = raw_config.get("dtype") or raw_config.get("torch_dtype") or "float32"
        dtype = getattr(torch, str(name).removeprefix("torch."))
    if dtype is None:
        return torch.get_default_dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"dtype {dtype!r} is not a torch dtype")
    return dtype


def build_empty(folder, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of ``folder/config.json`` with parameters on the meta device (buffers stay real)."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with init_empty_weights(), _no_init():  # meta tensors need no random init (half of building)
        if cls is not None:
            model = cls._from_config(config, dtype=dtype)
        else:
            model = transformers.AutoModel.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # shared parameters become one object, so the plan sees them as aliases
    return model


def _is_hf(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _hf_quantizer(qcfg: QuantConfig):
    from transformers.quantizers import AutoHfQuantizer

    return AutoHfQuantizer.from_config(qcfg.to_bnb_config(), pre_quantized=True)


def _replace_modules(model, qcfg: QuantConfig, device_map, dtype):
    """Swaps nn.Linear for bitsandbytes modules; returns transformers' quantizer (or None)."""
    with _no_init():  # the new modules' meta weights need no random init (it was most of the swap)
        return _swap(model, qcfg, device_map, dtype)


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def _swap(model, qcfg: QuantConfig, device_map, dtype):
    if _is_hf(model):
        hfq = _hf_quantizer(qcfg)
        extra = qcfg.keep_in_fp32_modules or []
        if extra:  # accelerate's keep_in_fp32_modules: never quantized, kept in float32
            # transformers 5 holds a set here (modeling_utils.py, post_init), transformers 4 a list
            current = model._keep_in_fp32_modules or []
            merged = list(dict.fromkeys([*current, *extra]))
            model._keep_in_fp32_modules = set(merged) if isinstance(current, set) else merged
        # transformers swaps the modules inside its init context, whose default dtype is the model's
        # (modeling_utils.py, `get_init_context` / `local_torch_dtype`): the new modules' biases are
        # created in that dtype, and the loader keeps an unquantized tensor's skeleton dtype.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            hfq.preprocess_model(
                model=model,
                dtype=dtype,
                device_map=device_map if isinstance(device_map, dict) else None,
                checkpoint_files=[],
                use_kernels=False,
            )
        finally:
            torch.set_default_dtype(previous)
        return hfq
    from accelerate.utils.bnb import get_keys_to_not_convert, replace_with_bnb_layers

    acfg = qcfg.to_accelerate_config()
    skip = acfg.skip_modules if acfg.skip_modules is not None else get_keys_to_not_convert(model)
    skip = list(skip) + list(acfg.keep_in_fp32_modules or [])
    if isinstance(device_map, dict) and qcfg.llm_int8_enable_fp32_cpu_offload:
        skip += [k for k, v in device_map.items() if v in ("cpu", "disk")]
    replace_with_bnb_layers(model, acfg, modules_to_not_convert=skip)
    return None


def _dtype_of(model, dtype: torch.dtype, qcfg: QuantConfig | None, cast: bool = False) -> dict[str, torch.dtype]:
    """Per-parameter dtype for unquantized tensors (keep-in-fp32 rules of transformers and accelerate).

    ``cast``: every floating tensor outside the keep-in-fp32 rules goes to ``dtype`` (a model passed by the
    caller with a dtype asked for: accelerate's ``load_checkpoint_in_model(dtype=torch_dtype)``); otherwise
    the skeleton's dtype stays, as transformers keeps an empty parameter's dtype (core_model_loading.py).
    """
    patterns: list[str] = []
    plan_fn = getattr(model, "_get_dtype_plan", None)
    if plan_fn is not None:
        patterns += [k for k, v in plan_fn(dtype).items() if v == torch.float32]
    if qcfg is not None and qcfg.keep_in_fp32_modules:
        patterns += list(qcfg.keep_in_fp32_modules)
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.dtype.is_floating_point:
            continue
        out[name] = torch.float32 if any(pat in name for pat in patterns) else dtype if cast else p.dtype
    return out


def _quantized_modules(model) -> list[str]:
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


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

    Returns:
        The model, in eval mode, with bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers.
    """
    if quantize_on not in ("auto", "cpu", "device"):
        raise ConfigError(f'quantize_on={quantize_on!r}: use "auto", "cpu" or "device"')
    timeline = transfer.LAST_TIMELINE.reset()
    src = Source(path)
    raw_config = src.raw_config()
    qcfg, prequantized = _quant_config(cfg, raw_config)
    # A caller's empty model keeps its own dtype unless one is asked for (then every floating tensor is
    # cast to it, as accelerate's load_and_quantize_model casts to torch_dtype).
    cast = model is not None and _explicit_dtype(dtype, qcfg)
    if model is not None and not cast:
        dtype = _model_dtype(model)
    else:
        dtype = _resolve_dtype(dtype, qcfg, raw_config)
    ckpt = Checkpoint(src.weights)
    # A checkpoint read in place on the CPU (pre-quantized or plain) is made resident in the background,
    # with the GIL released, while the model skeleton is built below.
    prefetch = _prefetch(ckpt, threads) if (prequantized or qcfg is None) and _cpu_only(device_map) else None
    if not _cpu_only(device_map) and torch.cuda.is_available():
        transfer.prefetch_ring()  # pinning the ring overlaps building the skeleton
    caller_model = model is not None
    if model is None:
        if src.config_path is None:
            raise ConfigError(f"{src.path}: no config.json beside the weights; pass model= (an empty model)")
        model = build_empty(src.folder, dtype, trust_remote_code)
    hfq = _replace_modules(model, qcfg, device_map, dtype) if qcfg is not None else None
    timeline.mark("skeleton")
    dmap = dmap_mod.resolve(model, device_map, max_memory, hfq)
    if qcfg is not None:
        quantized = _quantized_modules(model)
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
    plan = _plan(model, ckpt, src, dtype, qcfg, prequantized, cast)
    if prefetch is not None:
        prefetch.join()
    timeline.mark("plan")
    offload_index = _fill(
        model, ckpt, plan, dmap, qcfg, offload_folder, progress, threads, prefetch is not None, quantize_on != "cpu"
    )
    timeline.mark("fill")
    _raise_glibc_mmap_threshold()
    _finalize(model, plan, dmap, hfq, qcfg, offload_folder, offload_index)
    timeline.mark("finalize")
    return model


def _plan(model, ckpt: Checkpoint, src: Source, dtype: torch.dtype, qcfg, prequantized: bool, cast=False) -> Plan:
    """The plan of ``model`` over ``ckpt``, checked complete: shared by ``load`` and ``prepare``."""
    plan = make_plan(
        model,
        ckpt,
        dtype_of=_dtype_of(model, dtype, qcfg, cast),
        quantize_fp16_weights=not (qcfg is not None and qcfg.llm_int8_has_fp16_weight),
        quantize_dtype=dtype,
    )
    check_complete(plan, str(src.path))
    if prequantized and plan.by_kind("4bit", "int8"):
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
    src = Source(path)
    raw_config = src.raw_config()
    qcfg, prequantized = _quant_config(cfg, raw_config)
    dtype = _resolve_dtype(dtype, qcfg, raw_config)
    ckpt = Checkpoint(src.weights)
    if src.config_path is None:
        raise ConfigError(f"{src.path}: no config.json beside the weights")
    model = build_empty(src.folder, dtype, trust_remote_code)
    hfq = _replace_modules(model, qcfg, None, dtype) if qcfg is not None else None
    plan = _plan(model, ckpt, src, dtype, qcfg, prequantized)
    return Prepared(model, plan, qcfg, dtype, ckpt, src, prequantized, hfq)


def _cpu_only(device_map) -> bool:
    """Whether every tensor goes to the CPU (known before the model exists)."""
    if device_map is None:
        return not torch.cuda.is_available()
    return device_map in ("cpu", {"": "cpu"}) or device_map == torch.device("cpu")


def _prefetch(ckpt: Checkpoint, threads) -> threading.Thread:
    t = threading.Thread(target=ckpt.populate, args=(ckpt.keys(),), kwargs={"threads": threads}, daemon=True)
    t.start()
    return t


def _fill(
    model, ckpt: Checkpoint, plan: Plan, dmap: dict, qcfg, offload_folder, progress: bool, threads,
    resident_already: bool = False, quantize_on_device: bool = True,
):
    """Places every tensor. Tensors bound for a GPU stream through the pinned ring (device_fill.py),
    quantized there unless asked otherwise; for the rest, the Rust pipeline quantizes in the background
    while the unquantized tensors are placed here; packed results are installed as they arrive."""
    from tqdm.auto import tqdm

    bar = tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc="fastq.load", disable=not progress)
    if any(cuda_device(v) is not None for v in dmap.values()):
        left = fill_on_device(
            model, ckpt, [e for e in plan.entries if e.kind != "tied"], dmap, qcfg.spec if qcfg else None,
            quantize=quantize_on_device, threads=threads, timeline=transfer.LAST_TIMELINE.timeline,
            on_placed=lambda e: bar.update(e.nbytes),
        )
        plan = Plan(left, plan.missing, plan.unused)

    # Every weight streams through the Rust pipeline; one stored in another dtype than the one it is
    # quantized from (a float32 checkpoint loaded as bfloat16) is cast there first (plan.Entry.dtype).
    quantized = plan.by_kind("4bit", "int8")
    jobs = [(e.source, qcfg.spec, e.transpose, e.dtype) for e in quantized]
    pending = {e.source: e for e in quantized}
    results = ckpt.quantize(jobs, threads=threads) if jobs else iter(())
    # Tensors used in place on the CPU (zero-copy views of the mapping) are made resident now, in
    # parallel, rather than faulted in page by page on first use.
    resident = [
        src
        for e in plan.by_kind("plain", "4bit-pre", "int8-pre")
        if dmap_mod.device_of(e.name, dmap) == "cpu"
        for src in (e.source, *e.extra.values())
    ]
    if resident and not resident_already:
        ckpt.populate(resident, threads=threads)
    offload_index: dict = {}
    try:
        for e in plan.by_kind("plain"):
            dev = dmap_mod.device_of(e.name, dmap)
            value = ckpt.get(e.source)
            if e.transpose:
                value = value.t()
            if dev == "disk":
                _offload(e.name, value.to(e.dtype) if e.dtype else value, offload_folder, offload_index)
            else:
                set_plain(model, e.name, value, dev, e.dtype)
            bar.update(e.nbytes)
        for e in plan.by_kind("4bit-pre", "int8-pre"):
            module = get_submodule(model, e.module)
            dev = dmap_mod.device_of(e.name, dmap)
            weight = ckpt.get(e.source)
            if e.kind == "4bit-pre":
                stats = {k: ckpt.get(v) for k, v in e.extra.items() if k != QUANT_STATE}
                qs = e.extra[QUANT_STATE]  # "<module>.weight.quant_state.bitsandbytes__nf4"
                stats[quant_state_stat(qs)] = ckpt.get(qs)
                prequantized_4bit(module, weight, stats, dev)
            else:
                prequantized_int8(module, weight, ckpt.get(e.extra[SCB]), dev)
            bar.update(e.nbytes)
        for name, res in results:
            e = pending.pop(name)
            _install(model, e, res, dmap, qcfg)
            bar.update(e.nbytes)
    finally:
        bar.close()
        if hasattr(results, "close"):
            results.close()
    if offload_index:
        from accelerate.utils import save_offload_index

        save_offload_index(offload_index, offload_folder)
    return offload_index


def _install(model, e, res, dmap: dict, qcfg) -> None:
    module = get_submodule(model, e.module)
    dev = dmap_mod.device_of(e.name, dmap)
    if qcfg.is_8bit:
        set_int8(module, res[0], res[1], dev)
    else:
        set_4bit(module, res[0], res[1], dev)


def _raise_glibc_mmap_threshold() -> None:
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


def _offload(name: str, value: torch.Tensor, folder, index: dict) -> None:
    from accelerate.utils import offload_weight

    if folder is None:
        raise ConfigError("the device map sends weights to disk: pass offload_folder=")
    os.makedirs(folder, exist_ok=True)
    offload_weight(value, name, folder, index=index)


def _finalize(model, plan: Plan, dmap: dict, hfq, qcfg, offload_folder, offload_index) -> None:
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
    for dev in devices:  # the pinned host-to-GPU copies (modules.to_device) are asynchronous
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
    model.eval()


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
