"""FSDP2 + QLoRA on the CPU: gloo processes wrap a 4-bit model (``bnb_4bit_quant_storage=bfloat16``, so
packed weights flatten with the others) in ``fully_shard`` and train LoRA adapters (tests/fsdp_worker.py).

A fastq-loaded model gives the losses of the transformers-loaded one, step for step, whether every rank
loads it whole (a device map, or ``shard=False``) or only its share (no device map under a process
group: shard.py); the share's shards are FSDP's chunks of the full model, its counters about half of a
one-process load's, and its forward and ``state_dict()`` refuse to run before ``fully_shard``."""

from __future__ import annotations

import functools
import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import fastq
import pytest
import torch

WORKER = Path(__file__).with_name("fsdp_worker.py")
sys.path.insert(0, str(WORKER.parent))
from fsdp_worker import bnb_config, digest

WORLD = 2


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@functools.cache
def _run(folder: str, steps: str, world: int = WORLD) -> dict:
    """The worker's output: ``losses[step]``, ``stats[step][rank]``, ``digest[step][rank]``,
    ``shards[step][rank]``, ``lines`` (the rest)."""
    out = subprocess.run([sys.executable, str(WORKER), folder, _port(), str(world), steps], capture_output=True,
                         text=True, timeout=280, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    got: dict = {"losses": {}, "stats": {}, "digest": {}, "shards": {}, "lines": []}
    for line in out.stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "LOSSES":
            step, *xs = rest.split()
            got["losses"][step] = [float(x) for x in xs]
        elif kind in ("STATS", "DIGEST", "SHARDS"):
            step, rank, value = rest.split(" ", 2)
            got[kind.lower()].setdefault(step, {})[int(rank)] = json.loads(value) if kind == "STATS" else value
        else:
            got["lines"].append(line)
    return got


def _reference(folder):
    return _run(folder, "fq:nf4,tf:nf4,tf:dq,fq:dq")


def _share(folder):
    return _run(folder, "share:nf4,share:dq,full:dq,int8:-")


@pytest.mark.timeout(600)
def test_fsdp2_qlora_trains_like_transformers(tiny_model):
    got = _reference(tiny_model("llama"))["losses"]
    assert got["fq:nf4"] == pytest.approx(got["tf:nf4"], rel=1e-6, abs=1e-6)
    assert got["fq:nf4"][-1] < got["fq:nf4"][0]  # the adapters learn


@pytest.mark.timeout(600)
def test_share_mode_trains_like_transformers(tiny_model):
    folder = tiny_model("llama")
    ref, share = _reference(folder)["losses"], _share(folder)
    got = share["losses"]
    assert got["share:nf4"] == pytest.approx(ref["tf:nf4"], rel=1e-6, abs=1e-6)
    # Double quant: the same bytes as fastq's whole load (its nested codes round as bitsandbytes' CUDA
    # kernel does), so the same losses; transformers on the CPU rounds the nested codes through
    # bitsandbytes' lookup table (about 0.2% of codes differ, rust/core/quant/double.rs), hence 1e-3 there.
    assert got["share:dq"] == pytest.approx(ref["fq:dq"], rel=1e-6, abs=1e-6)
    assert got["share:dq"] == pytest.approx(ref["tf:dq"], rel=1e-3)
    assert got["share:dq"][-1] < got["share:dq"][0]
    # After fully_shard, each rank's shards are FSDP's chunks of the full model, and its quant states full.
    assert share["shards"] == {s: dict.fromkeys(range(WORLD), "ok") for s in ("share:nf4", "share:dq")}


def _checkpoint_facts(folder: str, quant: str, world: int = WORLD) -> dict:
    """From a one-process full load and the checkpoint: the bytes of the quant states (replicated on every
    rank), one row of every tensor (the most a rank's share can exceed an even split by), and the
    elements quantized twice where the two ranks' element ranges split a block."""
    model = fastq.load(folder, bnb_config(quant), "cpu", dtype=torch.bfloat16, progress=False)
    import bitsandbytes as bnb

    qs, overlap = 0, 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            s = m.quant_state
            for t in (s.absmax, s.code, s.offset, *((s.state2.absmax, s.state2.code) if s.nested else ())):
                qs += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
            n, per_row = math.prod(s.shape), 2 * m.weight.element_size()
            rows = -(-n // per_row)
            for k in range(1, world):
                cut = min(k * -(-rows // world) * per_row, n)  # rank k's first element
                overlap += s.blocksize if 0 < cut < n and cut % s.blocksize else 0
    ckpt = fastq.open(Path(folder) / "model.safetensors")
    row = sum(ckpt.meta(k).nbytes // max(ckpt.meta(k).shape[0], 1) for k in ckpt)
    return {"qs": qs, "overlap": overlap, "row": row}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("quant", ["nf4", "dq"])
def test_share_counters_are_half_of_one_process(tiny_model, quant):
    folder = tiny_model("llama")
    one = _run(folder, "stats:nf4,stats:dq", world=1)["stats"][f"stats:{quant}"][0]
    two = _share(folder)["stats"][f"share:{quant}"]
    f = _checkpoint_facts(folder, quant)
    assert one["world"] == 1 and sorted(two) == list(range(WORLD))
    # No repeated work: the ranks quantize the one-process count between them, plus the blocks that
    # straddle a rank boundary (none in the tiny model, whose rank boundaries fall on block boundaries).
    assert sum(r["quantized_elements"] for r in two.values()) == one["quantized_elements"] + f["overlap"]
    # Reads: every byte once, the straddling blocks (bfloat16) twice.
    assert sum(r["read_bytes"] for r in two.values()) == one["read_bytes"] + 2 * f["overlap"]
    # Host memory: the shares once, the quant states on every rank.
    assert sum(r["host_bytes"] for r in two.values()) == one["host_bytes"] + (WORLD - 1) * f["qs"]
    for r in two.values():
        assert abs(r["read_bytes"] - one["read_bytes"] / WORLD) <= f["row"] + 2 * f["overlap"]
        shares = (one["host_bytes"] - f["qs"]) / WORLD
        assert abs(r["host_bytes"] - f["qs"] - shares) <= f["row"]
        assert r["read_bytes"] < 0.6 * one["read_bytes"]


@pytest.mark.timeout(600)
def test_share_forward_is_refused_before_fully_shard_and_full_copy_with_shard_false(tiny_model):
    """The worker's share steps raise AssertionError unless the forward and state_dict() (after
    get_peft_model, before fully_shard) raised PartialShareError naming the rank and the fix, and
    state_dict() runs after fully_shard; shard=False gives every rank the whole model."""
    folder = tiny_model("llama")
    share = _share(folder)
    assert set(share["losses"]) >= {"share:nf4", "share:dq", "full:dq"}
    whole = fastq.load(folder, bnb_config("dq"), "cpu", dtype=torch.bfloat16, progress=False)
    assert share["digest"]["full:dq"] == dict.fromkeys(range(WORLD), digest(whole))
    assert share["losses"]["full:dq"] == pytest.approx(_reference(folder)["losses"]["fq:dq"], rel=1e-6, abs=1e-6)


@pytest.mark.timeout(600)
def test_int8_share_mode_is_refused(tiny_model):
    """LLM.int8 under FSDP2 does not train (fully_shard replaces Int8Params by a plain parameter, which has
    no CB: transformers' int8 model fails at its first forward), so fastq refuses it at load, naming 4-bit
    with bfloat16 storage and shard=False."""
    lines = _share(tiny_model("llama"))["lines"]
    for rank in range(WORLD):
        assert f"INT8 fastq {rank} ConfigError True" in lines
        assert any(x.startswith(f"INT8 transformers {rank} AttributeError") and "CB" in x for x in lines)


def test_shard_true_needs_a_process_group(tiny_model):
    folder = tiny_model("llama")
    with pytest.raises(fastq.ConfigError, match="init_process_group"):
        fastq.load(folder, bnb_config("nf4"), dtype=torch.bfloat16, progress=False, shard=True)
    model = fastq.load(folder, bnb_config("nf4"), dtype=torch.bfloat16, progress=False)
    assert not hasattr(model, "fastq_share")  # no process group: the whole model, as before


@pytest.mark.timeout(600)
def test_share_over_three_ranks_splits_blocks(tiny_model):
    """Three ranks: the rank boundaries of most 4-bit weights fall inside quantization blocks (both
    neighbours quantize those), the trailing rank gets fewer rows; the shards are still FSDP's chunks
    of the full model and the quant states the full ones."""
    folder = tiny_model("llama")
    got = _run(folder, "check:dq", world=3)
    assert got["shards"] == {"check:dq": dict.fromkeys(range(3), "ok")}
    one = _run(folder, "stats:nf4,stats:dq", world=1)["stats"]["stats:dq"][0]
    f = _checkpoint_facts(folder, "dq", world=3)
    assert f["overlap"] > 0
    three = got["stats"]["check:dq"]
    assert sum(r["quantized_elements"] for r in three.values()) == one["quantized_elements"] + f["overlap"]
    assert sum(r["host_bytes"] for r in three.values()) == one["host_bytes"] + 2 * f["qs"]
