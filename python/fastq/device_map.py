"""Device maps on accelerate's and transformers' machinery: "auto", "balanced", "balanced_low_0",
"sequential", a device, or a dict; ``max_memory``; CPU and disk offload."""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

__all__ = ["STRATEGIES", "check_offload", "cpu_only", "cuda_device", "default_device", "device_of", "quantized_sizes", "resolve", "single_device"]

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def default_device() -> str:
    """The first GPU if there is one, else the CPU (what transformers picks for device_map=None)."""
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def cpu_only(device_map) -> bool:
    """Whether every tensor goes to the CPU (known before the model exists: ``device_map`` as given)."""
    if device_map is None:
        return not torch.cuda.is_available()
    return device_map in ("cpu", {"": "cpu"}) or device_map == torch.device("cpu")


def single_device(device_map) -> str | None:
    """The one device every tensor goes to when ``device_map`` as given says so before the model exists
    (None, a device, or ``{"": device}``), normalized as ``resolve`` gives it; None for a strategy or a
    map of several entries."""
    if device_map is None:
        return default_device()
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            return None
        device_map = device_map[""]
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return None
    if isinstance(device_map, (int, str, torch.device)):
        return _norm(device_map)
    return None


def _norm(value):
    if isinstance(value, torch.device):
        return str(value) if value.index is not None or value.type != "cuda" else "cuda:0"
    if isinstance(value, int):
        return f"cuda:{value}"
    if value == "cuda":
        return "cuda:0"
    return value


def resolve(model: torch.nn.Module, device_map, max_memory=None, hf_quantizer=None, no_split=None) -> dict[str, str]:
    """The full device map: module-name prefix -> "cpu" / "cuda:N" / "disk".

    Args:
        model: the skeleton with bitsandbytes modules in place (their packed sizes count).
        device_map: None, a device (str, int, torch.device), a strategy name, or a dict.
        max_memory: per-device limits for the strategies ({0: "10GiB", "cpu": "30GiB"}).
        hf_quantizer: transformers' quantizer of the model, so sizes are the quantized ones.
        no_split: module classes never split across devices (default: the model's ``_no_split_modules``).
    """
    if device_map is None:
        return {"": default_device()}
    if isinstance(device_map, (int, torch.device)) or (isinstance(device_map, str) and device_map not in STRATEGIES):
        dev = _norm(device_map)
        if dev == "disk":
            raise ConfigError('device_map="disk" would put every weight on disk; use a dict or "auto" with max_memory')
        try:
            torch.device(dev)
        except RuntimeError as e:
            raise ConfigError(f"device_map={device_map!r} is neither a device nor one of {STRATEGIES}") from e
        return {"": dev}
    if isinstance(device_map, str):
        dm = _strategy(model, device_map, max_memory, hf_quantizer, no_split)
        return {k: _norm(v) for k, v in dm.items()}
    if isinstance(device_map, dict):
        names = dict(model.named_modules())
        params = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        for key in device_map:
            if key and key not in names and key not in params:
                raise ConfigError(f"device_map names '{key}', which is not a module or parameter of the model")
        covered = [n for n in params if device_of(n, device_map) is None]
        if covered:
            raise ConfigError(
                f"device_map does not place {len(covered)} parameter(s), e.g. '{covered[0]}'; add an entry for it "
                "or a catch-all '' entry"
            )
        return {k: _norm(v) for k, v in device_map.items()}
    raise ConfigError(f"device_map must be None, a device, one of {STRATEGIES} or a dict, not {type(device_map).__name__}")


def _strategy(model, strategy, max_memory, hf_quantizer, no_split) -> dict:
    if quantized_sizes(model):
        return _quantized_strategy(model, strategy, max_memory, no_split)
    if hf_quantizer is not None or hasattr(model, "_no_split_modules"):
        try:  # transformers' own computation, so the same map comes out as from_pretrained's
            from transformers.integrations.accelerate import _get_device_map

            return _get_device_map(model, strategy, max_memory, hf_quantizer)
        except ImportError:  # pragma: no cover - older transformers
            pass
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = no_split or getattr(model, "_no_split_modules", None) or []
    if strategy == "sequential":
        mem = get_max_memory(max_memory)
    else:
        mem = get_balanced_memory(
            model, max_memory=max_memory, no_split_module_classes=no_split, low_zero=strategy == "balanced_low_0"
        )
    return infer_auto_device_map(model, max_memory=mem, no_split_module_classes=no_split)


STATS = "_fastq_stats"


def quantized_sizes(model) -> dict[str, tuple[int, int]]:
    """For each bitsandbytes weight of the skeleton: (bytes of its packed data, bytes of its statistics).

    4-bit: ``ceil(n / 2)`` packed bytes; absmax float32 per block, or with double quantization a byte
    per block plus float32 per 256 blocks and the 256-entry nested map; the 16-entry code. int8: one byte
    per weight and float32 per row (``SCB``).
    """
    import bitsandbytes as bnb

    out = {}
    for mname, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        name = f"{mname}.weight" if mname else "weight"
        if isinstance(w, bnb.nn.Params4bit):
            n = w.numel()
            blocks = -(-n // w.blocksize)
            stats = blocks + (-(-blocks // 256)) * 4 + 256 * 4 if w.compress_statistics else blocks * 4
            out[name] = ((n + 1) // 2, stats + 16 * 4)
        elif isinstance(w, bnb.nn.Int8Params) and not w.has_fp16_weights:
            out[name] = (w.numel(), w.shape[0] * 4)
    return out


@contextlib.contextmanager
def _exact_sizes(model):
    """accelerate counts a parameter as numel x element size: a 4-bit weight's ``[out, in]`` uint8
    placeholder as a byte per weight (twice its packed size) and no statistics, so ``"auto"`` and
    ``"balanced"`` piled a 4-bit model onto one GPU (accelerate #2586). For the planning only, each
    quantized weight counts at its packed size (``special_dtypes``: 4 bits, or int8) and a meta buffer
    on its module holds its statistics' bytes; the buffers are removed afterwards."""
    from accelerate.utils import CustomDtype

    sizes = quantized_sizes(model)
    special, owners = {}, []
    for name, (_, stats) in sizes.items():
        mname = name.rpartition(".")[0]
        mod = model.get_submodule(mname) if mname else model
        special[name] = CustomDtype.INT4 if getattr(mod.weight, "quant_type", None) else torch.int8
        mod.register_buffer(STATS, torch.empty(stats, dtype=torch.uint8, device="meta"), persistent=False)
        owners.append(mod)
    try:
        yield special
    finally:
        for mod in owners:
            del mod._buffers[STATS]


def _quantized_strategy(model, strategy, max_memory, no_split) -> dict:
    """accelerate's strategies over the bytes each module holds once quantized (``_exact_sizes``), with
    no other margin than accelerate's own (transformers' bitsandbytes quantizer also keeps 10% of every
    device back for buffers made while quantizing, which fastq does not make)."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = no_split or getattr(model, "_no_split_modules", None) or []
    with _exact_sizes(model) as special:
        limits = get_max_memory(max_memory)  # the budgets as given (or every device's free memory)
        mem = limits
        if strategy != "sequential":
            balanced = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                           special_dtypes=special, low_zero=strategy == "balanced_low_0")
            # Each GPU but the last gets its share of the quantized bytes plus half a block, so that the
            # split lands within one block of even; and infer_auto_device_map keeps room for its largest
            # layer on every device but the last (for offloading), which is given back here: without it
            # the first GPU got two to four blocks fewer than its share.
            total, largest, block = _layer_sizes(model, no_split, special)
            gpus = [k for k in balanced if isinstance(k, int)]
            low_zero = strategy == "balanced_low_0"
            share = total / max(1, len(gpus) - low_zero)
            mem = dict(balanced)
            for i, k in enumerate(gpus[:-1]):
                if not (low_zero and i == 0):
                    mem[k] = min(limits[k], int(share + largest + block // 2))
        dm = infer_auto_device_map(model, max_memory=mem, no_split_module_classes=no_split, special_dtypes=special)
    return {k: v for k, v in dm.items() if not k.endswith("." + STATS)}


def _layer_sizes(model, no_split, special) -> tuple[int, int, int]:
    """Bytes of the whole model, of the largest module accelerate places as one piece, and of the largest
    no-split block (a decoder layer), as they will be held (``_exact_sizes`` in force)."""
    from accelerate.utils import compute_module_sizes
    from accelerate.utils.modeling import get_max_layer_size

    sizes = compute_module_sizes(model, special_dtypes=special)
    largest = get_max_layer_size(list(model.named_children()), sizes, list(no_split))[0]
    blocks = [sizes[n] for n, m in model.named_modules() if n and type(m).__name__ in no_split]
    return sizes[""], largest, max(blocks, default=0)


def device_of(name: str, device_map: dict) -> str | None:
    """The device of a module or parameter: the longest device_map key that is a prefix of it."""
    best, best_len = None, -1
    for key, dev in device_map.items():
        if (key == "" or name == key or name.startswith(key + ".")) and len(key) > best_len:
            best, best_len = dev, len(key)
    return best


def check_offload(device_map: dict, quantized_modules: list[str], fp32_cpu_offload: bool) -> None:
    """Quantized modules cannot live on the CPU or disk next to GPU modules unless fp32 offload is on."""
    values = set(device_map.values())
    if values == {"cpu"} or not ({"cpu", "disk"} & values):
        return
    offloaded = [m for m in quantized_modules if device_of(m, device_map) in ("cpu", "disk")]
    if offloaded and not fp32_cpu_offload:
        raise ConfigError(
            f"{len(offloaded)} quantized module(s) (e.g. '{offloaded[0]}') are mapped to the CPU or disk while "
            "others are on a GPU. Either give the GPU more room (max_memory) or set "
            "llm_int8_enable_fp32_cpu_offload=True so the offloaded modules stay unquantized in float32."
        )


def cuda_device(dev) -> torch.device | None:
    """The CUDA device a device-map value names, or None for the CPU and disk."""
    if isinstance(dev, int):
        return torch.device("cuda", dev)
    if isinstance(dev, str) and dev.startswith("cuda"):
        d = torch.device(dev)
        return d if d.index is not None else torch.device("cuda", torch.cuda.current_device())
    return None
