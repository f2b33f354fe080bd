"""The memory of a 4-bit or 8-bit load estimated from the safetensors headers and config.json alone: no
torch, no transformers, no bitsandbytes, so ``fastq inspect`` answers in a fraction of a second.

The exact estimate (``fastq.inspect.estimate_bytes``) builds the empty model and plans it as ``convert``
does. This one decides from the tensors' names, shapes and dtypes which weights a load quantizes, by the
rule transformers 5 and bitsandbytes apply, then asks the Rust writer's layout (``_fastq.plan_layout``,
the one home of the sizes of bitsandbytes' side tensors) what ``convert`` would write for them. The rule,
from transformers (quantizers/quantizer_bnb_4bit.py and _8bit.py, ``_process_model_before_weight_loading``;
integrations/bitsandbytes.py, ``replace_with_bnb_linear``; quantizers/base.py, ``get_keys_to_not_convert``):

- only modules whose type is exactly ``nn.Linear``, or ``Conv1D`` (GPT-2, stored transposed), are
  quantized: not embeddings, not norms, not subclasses of ``nn.Linear`` (Falcon's ``FalconLinear``);
- ``modules_to_not_convert`` is the output embedding, the tied weights, the last parameter's module and
  the model class's ``_keep_in_fp32_modules`` (T5's ``wo``), matched by ``should_convert_module``;
- a tied weight is saved once (the output embedding is dropped when the input one is there);
- every unquantized floating tensor takes the model's dtype (config.json's, transformers 5's
  ``dtype="auto"``), float32 for the keep-in-fp32 modules when that dtype is float16; a quantized weight
  is cast to the model's dtype before it is quantized.

What the names cannot say is model code, so the rule is written down per family (``FAMILIES``, checked
against transformers' classes by tests/test_estimate.py) and answers only for the architectures listed
there; for any other checkpoint (another family or head, remote code, fused MoE experts, transformers 4)
``uncovered`` says why and ``fastq inspect`` builds the model instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from . import _fastq
from .bnb_format import QUANT_STATE, QUANT_STATE_SUFFIXES, SCB, WEIGHT_FORMAT, quant_state_key
from .dtype_names import FLOAT_INPUT_NAMES, st_of_name
from .source import config_dtype_name, transformers_reads_config_dtype

__all__ = ["FAMILIES", "Family", "estimate_from_headers", "uncovered"]

#: Leaf names of the ``nn.Embedding`` modules of the covered families (never quantized).
EMBEDDINGS = frozenset({
    "embed_tokens", "embed_positions", "embed_in", "wte", "wpe", "word_embeddings", "position_embeddings",
    "token_type_embeddings", "shared", "relative_attention_bias",
})
#: Input embeddings an output embedding is tied to (``tie_word_embeddings``).
INPUT_EMBEDDINGS = frozenset({"embed_tokens", "embed_in", "wte", "word_embeddings", "shared"})
#: Module names of the output embeddings (``get_output_embeddings()``; GPT-NeoX's is saved as embed_out).
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")


@dataclass(frozen=True)
class Family:
    """What transformers' model code decides for one ``model_type``, which the headers cannot show."""

    #: The model classes (config.json's ``architectures[0]``) the rule holds for.
    architectures: tuple[str, ...]
    #: The config class's default ``tie_word_embeddings`` (config.json may leave it out).
    tie_word_embeddings: bool
    #: Its linear layers are ``Conv1D`` (weights stored ``[in, out]``, transposed when quantized).
    conv1d: bool = False
    #: A regex (searched in the module name) of modules with 2-D weights that are no ``nn.Linear``.
    not_linear: str = ""
    #: The model class's ``_keep_in_fp32_modules``.
    keep_in_fp32: tuple[str, ...] = ()
    #: Weights always tied to ``shared.weight`` (T5's ``_tied_weights_keys``).
    tied_to_shared: tuple[str, ...] = ()
    #: Regexes (searched) of checkpoint tensors the model has no place for, which a load leaves unused:
    #: buffers older transformers saved (the model class's ``_keys_to_ignore_on_load_unexpected``).
    unexpected: tuple[str, ...] = ()


def _causal(name: str) -> tuple[str, ...]:
    return (f"{name}ForCausalLM", f"{name}Model")


#: The families the header rule covers, by config.json's ``model_type`` (transformers 5.x).
FAMILIES: dict[str, Family] = {
    "llama": Family(_causal("Llama"), False),
    "mistral": Family(_causal("Mistral"), False),
    "qwen2": Family(_causal("Qwen2"), False),
    "qwen3": Family(_causal("Qwen3"), False),
    "phi3": Family(_causal("Phi3"), False),
    "gemma": Family(_causal("Gemma"), True),
    "gemma2": Family(_causal("Gemma2"), True),
    "stablelm": Family(_causal("StableLm"), False),
    "starcoder2": Family(_causal("Starcoder2"), True),
    "olmo": Family(_causal("Olmo"), False),
    "gptj": Family(_causal("GPTJ"), False),
    "gpt_neox": Family(_causal("GPTNeoX"), False, unexpected=(r"\.attention\.(masked_)?bias$",)),
    "opt": Family(_causal("OPT"), True),
    "bloom": Family(_causal("Bloom"), True),
    "gpt2": Family(("GPT2LMHeadModel", "GPT2Model"), True, conv1d=True,
                   unexpected=(r"\.(attn|crossattention)\.(masked_)?bias$",)),
    # FalconLinear subclasses nn.Linear, and replace_with_bnb_linear swaps `type(module) is nn.Linear` only
    "falcon": Family(_causal("Falcon"), True,
                     not_linear=r"\.(self_attention\.(query_key_value|dense)|mlp\.dense_(h_to_4h|4h_to_h))$"),
    "bert": Family(("BertModel",), True),
    "t5": Family(("T5ForConditionalGeneration", "T5Model"), True, keep_in_fp32=("wo",),
                 tied_to_shared=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
                 unexpected=(r"EncDecAttention\.relative_attention_bias\.weight$",)),
}


def uncovered(config: dict, names) -> str | None:
    """Why the header rule cannot estimate a load of this checkpoint (None: it can).

    Args:
        config: config.json as a dict.
        names: the checkpoint's tensor names.
    """
    if not transformers_reads_config_dtype():
        return "the rule is transformers 5's, and transformers 4 is installed"
    if "auto_map" in config:
        return "the model has its own code (auto_map in config.json)"
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        return f"model_type {model_type!r} is not one the rule covers"
    arch = (config.get("architectures") or [None])[0]
    if arch not in family.architectures:
        return f"architecture {arch!r} is not one the rule covers for {model_type}"
    if st_of_name(config_dtype_name(config)) not in FLOAT_INPUT_NAMES:
        return f"config.json's dtype {config_dtype_name(config)!r} is not float32, float16 or bfloat16"
    if any(".experts." in n for n in names):
        return "the checkpoint holds MoE experts"
    return None


def _converted(module: str, patterns: list[str]) -> bool:
    """transformers' ``should_convert_module`` (quantizers/quantizers_utils.py): a pattern skips a module
    it matches from the start up to a module boundary, as a regex, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return not any(re.match(rf"(?:{key}){boundary}", module) or module.endswith(key) for key in patterns)


def estimate_from_headers(
    path: str | os.PathLike, config: dict, *, load_in_8bit: bool = False, quant_type: str = "nf4",
    double_quant: bool = False,
) -> int:
    """Bytes of every tensor a load of ``path`` holds (what ``convert`` would write), from the headers.

    Args:
        path: the checkpoint (folder or safetensors file); ``uncovered(config, names)`` must be None.
        config: its config.json as a dict.
        load_in_8bit: LLM.int8 instead of 4-bit.
        quant_type: the 4-bit data type ("nf4", "fp4"); bitsandbytes' default block size and uint8 storage.
        double_quant: quantize the 4-bit statistics again.

    Returns:
        The sum of the sizes ``_fastq.plan_layout`` plans (with double quant, the bound of each
        ``quant_state`` JSON, as the exact estimate gives).
    """
    family = FAMILIES[config["model_type"]]
    ckpt = _fastq.Checkpoint(os.fspath(path))
    metas = {name: (dtype, shape) for name, dtype, shape, _, _ in ckpt.tensors()}
    model_dtype = st_of_name(config_dtype_name(config))
    tied = config.get("tie_word_embeddings", family.tie_word_embeddings)
    has_input_embedding = any(n.rpartition(".weight")[0].rpartition(".")[2] in INPUT_EMBEDDINGS for n in metas)
    dropped = {n for n in family.tied_to_shared if "shared.weight" in metas}
    if tied and has_input_embedding:
        dropped |= {f"{m}.weight" for m in OUTPUT_EMBEDDINGS}
    patterns = [*OUTPUT_EMBEDDINGS, *family.keep_in_fp32]
    fp32 = family.keep_in_fp32 if model_dtype == "F16" else ()  # _get_dtype_plan: for float16 only
    jobs: list[_fastq.Job] = []
    outputs: list[_fastq.Output] = []
    for name, (dtype, shape) in metas.items():
        if name in dropped or any(re.search(p, name) for p in family.unexpected):
            continue
        module, _, leaf = name.rpartition(".")
        is_float = dtype in FLOAT_INPUT_NAMES
        quantized = (
            leaf == "weight" and len(shape) == 2 and is_float
            and module.rpartition(".")[2] not in EMBEDDINGS
            and not (family.not_linear and re.search(family.not_linear, module))
            and _converted(module, patterns)
        )
        if not quantized:
            target = ("F32" if any(p in name for p in fp32) else model_dtype) if is_float else dtype
            outputs.append(_fastq.Output.copy(name, name, False, target if target != dtype else None))
            continue
        j = len(jobs)
        cast = model_dtype if model_dtype != dtype else None
        outputs.append(_fastq.Output.part(name, j, "weight"))
        if load_in_8bit:
            jobs.append(_fastq.Job.int8(name, transpose=family.conv1d, cast=cast))
            outputs += [_fastq.Output.part(f"{module}.{p}", j, p) for p in (SCB, WEIGHT_FORMAT)]
        else:
            jobs.append(_fastq.Job.four_bit(name, quant_type, double_quant=double_quant, transpose=family.conv1d,
                                            cast=cast))
            stats = QUANT_STATE_SUFFIXES if double_quant else QUANT_STATE_SUFFIXES[:2]
            outputs += [_fastq.Output.part(f"{name}.{p}", j, p) for p in stats]
            outputs.append(_fastq.Output.part(f"{name}.{quant_state_key(quant_type)}", j, QUANT_STATE))
    layout = _fastq.plan_layout(os.fspath(path), jobs, outputs, 1 << 62)
    return sum(size for _, tensors in layout for _, _, _, size, _ in tensors)
