"""Building the empty model: the skeleton of ``config.json`` on the meta device, with transformers' own
quantizer (or accelerate's, for a model that is not a transformers one) swapping ``nn.Linear`` for
bitsandbytes modules, so the same modules come out as from ``from_pretrained``; and the per-parameter
dtype rules (keep-in-fp32) the plan applies to unquantized tensors.
"""

from __future__ import annotations

import contextlib

import torch

from .config import QuantConfig

__all__ = ["build_empty", "init_non_persistent_buffers", "no_init", "param_dtypes", "quantized_modules", "replace_modules"]


def build_empty(folder, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of ``folder/config.json`` with parameters on the meta device (buffers stay real)."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with init_empty_weights(), no_init():  # meta tensors need no random init (half of building)
        if cls is not None:
            model = cls._from_config(config, dtype=dtype)
        else:
            model = transformers.AutoModel.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # shared parameters become one object, so the plan sees them as aliases
    init_non_persistent_buffers(model)
    return model


def init_non_persistent_buffers(model) -> None:
    """Recomputes the buffers no checkpoint holds (rotary tables, position ids) the way ``from_pretrained``
    does once the weights are in: ``initialize_weights`` outside the dtype of construction, with every
    parameter and persistent buffer marked initialized so that only those buffers are touched
    (modeling_utils.py ``_move_missing_keys_from_meta_to_device`` / ``_initialize_missing_keys``).
    Built under ``dtype=bfloat16``, GPT-J's sinusoidal table was computed in bfloat16 and its logits
    differed from transformers'."""
    named = getattr(model, "named_non_persistent_buffers", None)
    if named is None or not hasattr(model, "initialize_weights"):
        return
    volatile = {id(b) for _, b in named()}
    for p in model.parameters():
        p._is_hf_initialized = True
    for _, b in model.named_buffers():
        if id(b) not in volatile:
            b._is_hf_initialized = True
    model.initialize_weights()


def _is_hf(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _hf_quantizer(qcfg: QuantConfig):
    from transformers.quantizers import AutoHfQuantizer

    return AutoHfQuantizer.from_config(qcfg.to_bnb_config(), pre_quantized=True)


def replace_modules(model, qcfg: QuantConfig, device_map, dtype):
    """Swaps nn.Linear for bitsandbytes modules, and with ``quantize_experts`` fused MoE experts for
    fastq's ``QuantizedExperts`` (experts.py); returns transformers' quantizer (or None)."""
    with no_init():  # the new modules' meta weights need no random init (it was most of the swap)
        hfq = _swap(model, qcfg, device_map, dtype)
    if qcfg.quantize_experts:
        from .experts import swap_experts

        swap_experts(model, qcfg)
    return hfq


def no_init():
    """transformers' context that skips random weight init (a no-op context on transformers without it)."""
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


def param_dtypes(model, dtype: torch.dtype, qcfg: QuantConfig | None, cast: bool = False) -> dict[str, torch.dtype]:
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


def quantized_modules(model) -> list[str]:
    """Names of the model's bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` modules."""
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
