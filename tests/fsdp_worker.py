"""Gloo processes that load a 4-bit model (fastq or transformers) and train LoRA adapters on it wrapped in
FSDP2 (``fully_shard``); run by tests/test_fsdp.py:

    python3 tests/fsdp_worker.py FOLDER PORT WORLD STEP[,STEP...]

Each step is ``WHO:QUANT`` (QUANT: ``nf4``, or ``dq`` for NF4 with double quant; storage bfloat16):

- ``tf``: transformers' ``from_pretrained`` (device_map="cpu"), trained;
- ``fq``: ``fastq.load(..., "cpu")`` (a device map: a full copy per rank), trained;
- ``share``: ``fastq.load`` with no device map (the FSDP share mode), its forward and ``state_dict()``
  guards tried before ``fully_shard`` (and ``state_dict()`` after), its shards compared with FSDP's chunks of a full fastq load (``SHARDS``), trained;
  prints the rank's ``fastq_share`` counters;
- ``full``: ``fastq.load(..., shard=False)``, its digest printed, trained;
- ``check``: ``share`` without the training;
- ``stats``: ``fastq.load(..., shard=True)``, the counters printed (no training; any world size);
- ``int8:-``: LLM.int8 in share mode (fastq refuses it) and transformers' int8 model under fully_shard.

Rank 0 prints ``LOSSES STEP x ...``; every rank prints ``STATS STEP RANK json``, ``DIGEST STEP RANK hex``
and ``SHARDS STEP RANK ok``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist


def emit(line: str) -> None:
    """One line on stdout in one write (atomic on a pipe below PIPE_BUF): the ranks share the pipe."""
    os.write(1, (line + "\n").encode())


def bnb_config(quant: str):
    import transformers

    if quant == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=quant == "dq",
                                           bnb_4bit_quant_storage=torch.bfloat16,
                                           bnb_4bit_compute_dtype=torch.bfloat16)


def digest(model) -> str:
    """A hash of every parameter's and buffer's bytes and of every 4-bit weight's quant state."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _ids(rank: int) -> torch.Tensor:
    return torch.arange(16).repeat(2, 1) % 8 + 3 + rank  # a pattern the adapters can learn; one per rank


def _refused(model, rank: int) -> bool:
    """Whether the forward and ``state_dict()`` both raise PartialShareError naming the rank and the fix."""
    import fastq

    def refuses(call, what: str) -> bool:
        try:
            call()
        except fastq.PartialShareError as e:
            return what in str(e) and f"rank {rank} of {dist.get_world_size()}'s share" in str(e) and \
                "fully_shard" in str(e)
        return False

    return refuses(lambda: model(input_ids=_ids(rank)), "forward refused") and refuses(
        model.state_dict, "state_dict() refused")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def shards_match(model, reference, rank: int, world: int) -> str:
    """"ok" when every parameter's local shard after fully_shard is the chunk FSDP makes of the reference
    model's full parameter (torch.chunk on dim 0, trailing ranks empty), and every 4-bit layer's quant
    state is the reference's; else the first parameter that differs."""
    import bitsandbytes as bnb

    full = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        base = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if "lora_" in name:
            continue
        chunks = list(torch.chunk(full[base].detach(), world, dim=0))
        want = chunks[rank] if rank < len(chunks) else full[base].new_empty(0)
        if not torch.equal(_bytes(p.to_local()), _bytes(want)):
            return f"bad:{base}"
    ref_modules = dict(reference.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            a, b = m.quant_state, ref_modules[name.removeprefix("base_model.model.").removesuffix(".base_layer")].quant_state
            pairs = [(a.absmax, b.absmax), (a.code, b.code)]
            if b.nested:
                pairs += [(a.offset, b.offset), (a.state2.absmax, b.state2.absmax)]
            if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype or any(
                    not torch.equal(_bytes(x), _bytes(y)) for x, y in pairs):
                return f"bad-state:{name}"
    return "ok"


def train(model, rank: int, share: bool = False, reference=None, tag: str = "", steps: int = 6) -> list[float]:
    import peft
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    if share and not _refused(model, rank):
        raise AssertionError("the share's forward or state_dict() ran before fully_shard")
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    if share:
        model.state_dict()  # allowed once fully_shard replaced every partial parameter
    if reference is not None:
        emit(f"SHARDS {tag} {rank} {shards_match(model, reference, rank, dist.get_world_size())}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(rank)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _int8(folder: str, rank: int) -> None:
    import fastq
    import peft
    import transformers
    from torch.distributed.fsdp import fully_shard

    try:
        fastq.load(folder, bnb_config("int8"), dtype=torch.bfloat16, progress=False)
        emit(f"INT8 fastq {rank} loaded")
    except fastq.ConfigError as e:
        named = "bnb_4bit_quant_storage" in str(e) and "shard=False" in str(e)
        emit(f"INT8 fastq {rank} ConfigError {named}")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config("int8"),
                                                              device_map="cpu", dtype=torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    try:
        model(input_ids=_ids(rank), labels=_ids(rank)).loss.backward()
        emit(f"INT8 transformers {rank} trains")
    except AttributeError as e:
        emit(f"INT8 transformers {rank} AttributeError {e}")


def main(rank: int, world: int, folder: str, port: str, steps: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import fastq
    import transformers

    for step in steps.split(","):
        who, quant = step.split(":")
        if who == "int8":
            _int8(folder, rank)
            continue
        cfg = bnb_config(quant)
        if who == "tf":
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg,
                                                                      device_map="cpu", dtype=torch.bfloat16)
        else:
            args = {"fq": ("cpu", None), "share": (None, None), "check": (None, None), "full": (None, False),
                    "stats": (None, True)}[who]
            model = fastq.load(folder, cfg, args[0], dtype=torch.bfloat16, progress=False, shard=args[1])
        stats = getattr(model, "fastq_share", None)
        if stats is not None:
            emit(f"STATS {step} {rank} {json.dumps(dataclasses.asdict(stats))}")
        if who == "full":
            emit(f"DIGEST {step} {rank} {digest(model)}")
        reference = None
        if who in ("share", "check"):  # what each rank's shards must be: FSDP's chunks of fastq's full load
            reference = fastq.load(folder, cfg, "cpu", dtype=torch.bfloat16, progress=False)
        if who != "stats":
            losses = train(model, rank, share=reference is not None, reference=reference, tag=step,
                           steps=0 if who == "check" else 6)
            if rank == 0 and losses:
                emit(f"LOSSES {step} " + " ".join(repr(x) for x in losses))
        del model
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    folder, port, world, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    mp.spawn(main, args=(world, folder, port, steps), nprocs=world)
