"""MoE experts quantized, opt-in (``QuantConfig(quantize_experts=True)``): transformers 5 holds a MoE layer's
experts as fused 3-D parameters (``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj``
``[E, H, I]``) that bitsandbytes' module swap never sees (it replaces ``nn.Linear``), so every loader
leaves them in bf16 (bitsandbytes #1849). Here they are quantized per expert:

- 4-bit: each expert's ``[out, in]`` matrix quantized alone (blocks never cross an expert, and
  ``in % blocksize == 0`` so they never cross a row either), packed codes in a uint8 parameter
  ``[E, out * in / 2]`` beside a float32 ``<name>_absmax`` buffer ``[E, out * in / blocksize]``, no
  double quantization: the layout of bitsandbytes' open PR #1965 (``Experts4bit``).
- 8-bit: LLM.int8 rows per expert: an int8 parameter ``[E, out, in]`` and a float32 ``<name>_SCB``
  buffer ``[E, out]``, as ``Int8Params._quantize`` makes them (float16 first).

Quantized on the device the weights land on (bitsandbytes' CUDA kernels on a GPU, fastq's, which follow
them, on the CPU), as each fused tensor arrives (``install``), so the bf16 experts never sit in memory
all at once. The forward is the eager fused-experts loop of transformers
(``MixtralExperts.forward``) over the routed experts only, each dequantized by bitsandbytes
(``dequantize_4bit`` / ``int8_vectorwise_dequant``): it equals the same MoE run on the dequantized weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["QuantizedExperts", "fused_experts", "swap_experts"]

FUSED = ("gate_up_proj", "down_proj")


def fused_experts(model: nn.Module) -> list[str]:
    """Names of the modules that hold fused experts in the layout this module runs: 3-D ``gate_up_proj``
    ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``, an ``act_fn``, no biases."""
    out = []
    for name, m in model.named_modules():
        ps = dict(m.named_parameters(recurse=False))
        if set(ps) != set(FUSED) or not hasattr(m, "act_fn"):
            continue
        gu, dn = ps["gate_up_proj"], ps["down_proj"]
        if gu.dim() == 3 and dn.dim() == 3 and gu.shape[0] == dn.shape[0] and gu.shape[1] == 2 * dn.shape[2] \
                and gu.shape[2] == dn.shape[1]:
            out.append(name)
    return out


class QuantizedExperts(nn.Module):
    """Fused MoE experts in 4-bit (NF4/FP4) or LLM.int8, one quantization per expert (module docstring).

    Until ``install`` is called for a projection, its parameter is the meta placeholder of the fused
    shape, so the load plan sees the same names and shapes as transformers' experts module.
    """

    def __init__(self, experts: nn.Module, bits: int, quant_type: str = "nf4", blocksize: int = 64,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise ConfigError(f"experts quantize to 4 or 8 bits, not {bits}")
        self.bits, self.quant_type, self.blocksize = bits, quant_type, blocksize
        self.compute_dtype = compute_dtype
        self.act_fn = experts.act_fn
        self.num_experts = experts.gate_up_proj.shape[0]
        self.shapes = {n: tuple(getattr(experts, n).shape[1:]) for n in FUSED}
        self.dtype = experts.gate_up_proj.dtype
        for n in FUSED:
            in_features = self.shapes[n][1]
            if bits == 4 and in_features % blocksize:
                raise ConfigError(
                    f"quantize_experts: {n} has {in_features} inputs, not a multiple of the blocksize {blocksize}; "
                    "blocks would cross rows (bitsandbytes PR #1965 requires it)"
                )
            self.register_parameter(n, getattr(experts, n))

    def install(self, name: str, w: torch.Tensor) -> None:
        """Quantizes fused weight ``w`` (``[E, out, in]``, on its final device) expert by expert and
        replaces the placeholder ``name`` with the packed data and its statistics."""
        if tuple(w.shape) != (self.num_experts, *self.shapes[name]):
            raise ConfigError(f"{name}: expected {[self.num_experts, *self.shapes[name]]}, got {list(w.shape)}")
        self.dtype = w.dtype
        data, stats = zip(*(self._quantize(w[e].contiguous()) for e in range(self.num_experts)), strict=True)
        self._parameters[name] = nn.Parameter(torch.stack(data), requires_grad=False)
        self._buffers[f"{name}_{'absmax' if self.bits == 4 else 'SCB'}"] = torch.stack(stats)

    def _quantize(self, w: torch.Tensor):
        if self.bits == 4:
            if w.device.type == "cpu":
                from .ops import quantize_4bit
            else:
                from bitsandbytes.functional import quantize_4bit
            packed, state = quantize_4bit(w, blocksize=self.blocksize, quant_type=self.quant_type,
                                          compress_statistics=False)
            return packed.reshape(-1), state.absmax
        if w.device.type == "cpu":
            from .ops import quantize_int8

            return quantize_int8(w)
        from bitsandbytes.functional import int8_vectorwise_quant

        cb, scb, _ = int8_vectorwise_quant(w.to(torch.float16))  # Int8Params._quantize's float16 step
        return cb, scb

    def weight(self, name: str, e: int) -> torch.Tensor:
        """Expert ``e``'s ``[out, in]`` matrix of projection ``name``, dequantized by bitsandbytes."""
        import bitsandbytes.functional as bf

        data = self._parameters[name]
        if self.bits == 8:
            return bf.int8_vectorwise_dequant(data[e], self._buffers[f"{name}_SCB"][e]).to(self.dtype)
        state = bf.QuantState(
            absmax=self._buffers[f"{name}_absmax"][e], shape=torch.Size(self.shapes[name]), dtype=self.dtype,
            blocksize=self.blocksize, code=bf.get_4bit_type(self.quant_type, device=data.device),
            quant_type=self.quant_type,
        )
        return bf.dequantize_4bit(data[e].unsqueeze(1), state)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = int(e[0])
            if e == self.num_experts:
                continue
            pos, token = torch.where(mask[e])
            x = hidden_states[token]
            gate, up = nn.functional.linear(x, self.weight("gate_up_proj", e)).chunk(2, dim=-1)
            h = nn.functional.linear(self.act_fn(gate) * up, self.weight("down_proj", e))
            final.index_add_(0, token, (h * top_k_weights[token, pos, None]).to(final.dtype))
        return final


def swap_experts(model: nn.Module, qcfg) -> list[str]:
    """Replaces every fused-experts module of the skeleton with a ``QuantizedExperts`` shell (4-bit when
    the config is, else int8); returns their names."""
    names = fused_experts(model)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old = owner.get_submodule(leaf)
        bits = 4 if qcfg.is_4bit else 8
        new = QuantizedExperts(old, bits, qcfg.bnb_4bit_quant_type, qcfg.blocksize, qcfg.compute_dtype)
        setattr(owner, leaf, new)
    return names
