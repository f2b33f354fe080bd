"""A shard cut short by another process while fastq has it mapped (os.truncate after open + get, after
populate, during quantize): the Python process survives - the lost pages read as zeros instead of
raising SIGBUS (rust/core/guard.rs) - and the next check point raises TruncatedShardError naming the
file and the tensor. Each case runs in a child process, so that a regression kills the child, not the
test run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

#: Twelve 1 MiB bf16 tensors.
NAMES = [f"t{i:02d}" for i in range(12)]
STAGES = ["get", "populate", "quantize-pread", "quantize-mapped"]

CHILD = r"""
import json, os, sys
import fastq
from fastq import _fastq


def stage_run(path, stage, cut):
    ck = fastq.open(path)
    out = {}
    try:
        if stage == "get":
            first, lost = ck.get("t00"), ck.get("t10")
            before = float(lost.float().abs().sum())
            os.truncate(path, cut)
            out["lost_sum"] = float(lost.float().abs().sum())  # a SIGBUS without the guard
            out["lost_sum_before"] = before
            out["first_ok"] = bool((ck.get("t00") == first).all())
            ck.get("t10")
        elif stage == "populate":
            ck.populate(ck.keys())
            lost = ck.get("t10")
            os.truncate(path, cut)
            out["lost_sum"] = float(lost.float().abs().sum())
            ck.populate(["t00"])
            ck.populate(ck.keys())
        else:
            # Checkpoint.quantize's pipeline with one tensor per batch and one result in flight: the
            # worker cannot be more than two jobs ahead of the consumer, so t09 is quantized after the cut.
            transpose = stage == "quantize-mapped"
            jobs = [_fastq.Job.four_bit(n, "nf4", 64, True, transpose=transpose) for n in ck.keys()]
            results = ck.native.quantize(jobs, threads=1, batch_bytes=1, channel_capacity=1)
            names = [next(results)[0]]
            os.truncate(path, cut)
            for name, _ in results:
                names.append(name)
            out["names"] = names
    except fastq.FastqError as e:
        out.update(error=type(e).__name__, path=e.path, tensor=e.tensor, message=str(e))
    return out


print(json.dumps({stage: stage_run(path, stage, cut) for path, stage, cut in json.loads(sys.argv[1])}))
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cut")
    g = torch.Generator().manual_seed(0)
    ts = {n: torch.randn(512, 1024, generator=g).to(torch.bfloat16) for n in NAMES}
    path = folder / "model.safetensors"
    save_file(ts, path, metadata={"format": "pt"})
    return path.read_bytes()


def offsets(data: bytes) -> dict[str, tuple[int, int]]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__"}


def cut_of(source: bytes) -> tuple[int, set]:
    """Where the file is cut (inside t09) and the tensors that lose bytes there (t09, t10, t11)."""
    where = offsets(source)
    start, end = where["t09"]
    cut = (start + end) // 2 + 100
    return cut, {n for n, (_, e) in where.items() if e > cut}


def run_child(folder, source: bytes, stages, guard: bool = True) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs `stages` in one child process, each on its own copy of the checkpoint."""
    cut, _ = cut_of(source)
    runs, paths = [], {}
    for stage in stages:
        path = folder / f"{stage}.safetensors"
        path.write_bytes(source)
        runs.append((str(path), stage, cut))
        paths[stage] = str(path)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if not guard:
        env["FASTQ_SIGBUS_GUARD"] = "0"
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(runs)], capture_output=True, text=True,
                          env=env, timeout=240, check=False)
    return proc, paths


@pytest.fixture(scope="module")
def guarded(source, tmp_path_factory):
    proc, paths = run_child(tmp_path_factory.mktemp("guarded"), source, STAGES)
    assert proc.returncode == 0, f"child ended with {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), paths


@pytest.mark.parametrize("stage", STAGES)
def test_cut_shard_raises_instead_of_killing_the_process(guarded, source, stage):
    outs, paths = guarded
    out, path = outs[stage], paths[stage]
    _, lost = cut_of(source)
    assert out.get("error") == "TruncatedShardError", out
    assert out["path"] == path and path in out["message"]
    assert out["tensor"] in lost and f"'{out['tensor']}'" in out["message"]
    if stage == "get":
        assert out["first_ok"]
        assert out["lost_sum"] < out["lost_sum_before"]  # the lost half read as zeros
        assert out["tensor"] == "t10"
    if stage.startswith("quantize"):
        assert out["tensor"] == "t09"  # t00-t08 lie before the cut; t09 is the first job after it


def test_without_the_guard_the_same_read_is_a_sigbus(tmp_path, source):
    """The cases above do exercise the fault: with the guard off, the child dies of SIGBUS."""
    proc, _ = run_child(tmp_path, source, ["get"], guard=False)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr[-2000:])


def test_check_names_the_first_lost_tensor(tmp_path, source):
    import fastq

    path = tmp_path / "model.safetensors"
    path.write_bytes(source)
    ck = fastq.open(path)
    ck.check()
    start, _ = offsets(source)["t05"]
    os.truncate(path, start + 1)
    ck.check(["t00", "t04"])
    with pytest.raises(fastq.TruncatedShardError) as e:
        ck.check()
    assert e.value.path == str(path) and e.value.tensor == "t05"
