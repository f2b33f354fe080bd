"""Building the empty model: the skeleton of ``config.json`` on the meta device, with transformers' own
quantizer (or accelerate's, for a model that is not a transformers one) swapping ``nn.Linear`` for
bitsandbytes modules, so the same modules come out as from ``from_pretrained``; and the per-parameter
dtype rules (keep-in-fp32) the plan applies to unquantized tensors.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import threading
from pathlib import Path

import torch

from .config import QuantConfig
from .errors import ConfigFileError, ShapeError

#: Held while a skeleton is built and its modules swapped: accelerate's ``init_empty_weights``,
#: transformers' ``no_init_weights`` and the default dtype the swap sets are process-wide patches, so two
#: loads from two threads building at once got each other's real or meta parameters.
SKELETON_LOCK = threading.RLock()

__all__ = ["SKELETON_LOCK", "build_empty", "init_non_persistent_buffers", "no_init", "param_dtypes", "quantized_modules", "replace_modules"]


def build_empty(folder, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of ``folder/config.json`` with parameters on the meta device (buffers stay real).

    Raises:
        ConfigFileError: transformers refuses the config (an unknown model type, a field of the wrong type).
        ShapeError: a tensor of the model cannot be made with the shape the config gives (a dimension
            that overflows or is negative), naming the tensor and the config's out-of-range fields.
    """
    import transformers
    from accelerate import init_empty_weights
    from huggingface_hub.errors import StrictDataclassError

    config_path = Path(folder) / "config.json"
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as e:
        raise ConfigFileError(f"{config_path}: transformers cannot read it: {_first_lines(e, 2)}",
                              path=config_path) from e
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    try:
        with init_empty_weights(), no_init():  # meta tensors need no random init (half of building)
            if cls is not None:
                model = cls._from_config(config, dtype=dtype)
            else:
                model = transformers.AutoModel.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (RuntimeError, TypeError, ValueError, OverflowError) as e:
        shape_error = _shape_error(e, config_path, config.to_dict())
        if shape_error is None:
            raise
        raise shape_error from e
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


# What torch says when a shape cannot be made: too large for int64 or for memory, or negative.
_SHAPE_FAILURES = ("overflow", "negative dimension", "can't allocate memory")
# A dimension of this size or more (or a negative one) in config.json is what failed.
_SUSPECT = 2**31


def _first_lines(e: BaseException, n: int = 1) -> str:
    """The first ``n`` lines of an error's message, as one line (torch appends a C++ backtrace)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return " ".join(lines[:n]) or type(e).__name__


def _shape_error(e: BaseException, config_path: Path, config: dict) -> ShapeError | None:
    """The ``ShapeError`` a failed ``torch.empty`` while building the model stands for, or None when
    ``e`` is another failure. It names the tensor (``model.embed_tokens.weight``, from the frames that
    were building it) and the fields of config.json out of range."""
    reason = _first_lines(e)
    suspects = [
        f"{k}={v}" for k, v in config.items() if type(v) is int and (v < 0 or v >= _SUSPECT)
    ]
    if not any(k in reason.lower() for k in _SHAPE_FAILURES) or ("allocate" in reason and not suspects):
        return None  # a real lack of memory with plausible dimensions stays what it is
    tensor = _tensor_being_built(e)
    what = f"tensor {tensor}" if tensor else "a tensor of the model"
    hint = f"; out of range in config.json: {', '.join(suspects)}" if suspects else ""
    return ShapeError(f"{config_path}: {what} cannot be made with the shape the config gives ({reason}){hint}",
                      path=config_path, tensor=tensor)


def _tensor_being_built(e: BaseException, is_module=None) -> str | None:
    """The dotted name of the tensor whose ``torch.empty`` failed, from the ``__init__`` frames of the
    modules being built: each was assigning ``self.<name> = ...`` (``model``, ``embed_tokens``,
    ``weight``); where that statement builds a list of layers in a comprehension, the comprehension's
    frame holds the layer's index (Python 3.11; 3.12 inlines list comprehensions and the index is gone
    with the exception: ``*`` then, as in ``model.layers.*.mlp.gate_proj.weight``). None when a step is
    not such an assignment. ``is_module``: what counts as a module (default: ``torch.nn.Module``)."""
    is_module = is_module or (lambda obj: isinstance(obj, torch.nn.Module))
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    parts: list[str] = []
    loop_vars: tuple[str, ...] = ()  # of the comprehension the last module's statement builds with
    for frame in frames:
        code = frame.f_code
        if code.co_name in _COMPREHENSIONS and loop_vars:
            index = [v for k, v in frame.f_locals.items() if k in loop_vars and type(v) is int]
            parts.append(str(index[0]) if len(index) == 1 else "*")
            loop_vars = ()
        elif code.co_name == "__init__" and is_module(frame.f_locals.get("self")):
            if loop_vars:
                parts.append("*")
            found = _assigned_attribute(code.co_filename, frame.f_lineno)
            if found is None:
                return None
            name, loop_vars = found
            parts.append(name)
    return ".".join(parts) if parts else None


_COMPREHENSIONS = ("<listcomp>", "<genexpr>", "<setcomp>", "<dictcomp>")


def _assigned_attribute(filename: str, line: int | None) -> tuple[str, tuple[str, ...]] | None:
    """``(X, loop variables)`` when line ``line`` of ``filename`` is inside a statement ``self.X = ...``;
    the loop variables of the comprehensions in its value (``layer_idx``), if any."""
    best = None
    for start, end, name, loop_vars in _self_assignments(filename):
        if line is not None and start <= line <= end and (best is None or end - start < best[1] - best[0]):
            best = (start, end, name, loop_vars)
    return (best[2], best[3]) if best else None


@functools.lru_cache(maxsize=64)
def _self_assignments(filename: str) -> tuple[tuple[int, int, str, tuple[str, ...]], ...]:
    try:
        tree = ast.parse(Path(filename).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return ()
    out = []
    kinds = (ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp)
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                comps = [n for n in ast.walk(node.value) if isinstance(n, kinds)] if node.value is not None else []
                loop_vars = tuple(
                    v.id for c in comps for g in c.generators for v in ast.walk(g.target) if isinstance(v, ast.Name)
                )
                out.append((node.lineno, node.end_lineno or node.lineno, t.attr, loop_vars))
    return tuple(out)


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
