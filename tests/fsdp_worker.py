"""Two gloo processes train LoRA adapters on a 4-bit model wrapped in FSDP2 (``fully_shard``), loaded by
fastq or by transformers; rank 0 prints the losses. Run by tests/test_fsdp.py:

    python3 tests/fsdp_worker.py FOLDER fq|tf PORT
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(rank: int, world: int, folder: str, which: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import fastq
    import peft
    import transformers
    from torch.distributed.fsdp import fully_shard

    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_quant_storage=torch.bfloat16, bnb_4bit_compute_dtype=torch.bfloat16)
    if which == "fq":
        model = fastq.load(folder, cfg, "cpu", dtype=torch.bfloat16, progress=False)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, device_map="cpu",
                                                                  dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = (torch.arange(16).repeat(2, 1) % 8 + 3 + rank)  # a pattern the adapters can learn; one per rank
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    if rank == 0:
        print("LOSSES " + " ".join(repr(x) for x in losses), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(main, args=(2, *sys.argv[1:4]), nprocs=2)
