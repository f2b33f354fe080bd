"""Measurements behind the GPU path's choices (run on the GPU machine, after compare.py made its
checkpoints):

    python3 benches/gpu/probe.py --work /tmp/fastq-gpu --out $OUT [pin] [ring] [memory] [mapreg]

  pin     seconds to pin the ring's host memory for several sizes and ways (fresh process each, CUDA
          warm): one slot after the other, or the ring's threads with cudaHostAlloc or cudaHostRegister
  ring    fastq.load of the 7B-shaped checkpoint (plain bf16, NF4 + DQ, pre-quantized NF4) for several
          ring shapes and reader thread counts (FASTQ_RING_SLOTS / FASTQ_RING_SLOT_MIB /
          FASTQ_NUM_THREADS), through compare.py's cases: load seconds, phases, read/copy GB/s
  memory  what fastq keeps allocated on the GPU after a pre-quantized reload (and after
          quantize_on="cpu", and transformers' reload) beyond the model's own tensors, with the Python
          stack of each allocation (torch.cuda.memory._record_memory_history), and the bytes the caching
          allocator counts allocated beyond what was asked for (blocks not split: a 21.5 MiB tensor in a
          fresh 22 MiB segment holds the 0.5 MiB tail)
  mapreg  the copy without the host's copy: each bf16 shard mapped (page cache warm), its pages pinned in
          place by ``cudaHostRegister`` (read-only) chunk by chunk, each chunk copied to the GPU straight
          from the page cache; seconds to register, to copy, and both overlapped (one thread registers
          ahead while the copies run), against the shard's 16-thread pread into pinned memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent
RING_CONFIGS = [(4, 64, 0), (4, 64, 12), (4, 128, 0), (2, 128, 0), (8, 32, 0), (6, 64, 0)]


PIN_METHODS = ("serial", "alloc", "register")


def pin_case(slots: int, mib: int, method: str) -> dict:
    """Seconds until every slot is pinned: "serial" (one ``torch.empty(pin_memory=True)`` after the
    other, the ring before 2026-12-03), or the ring's own threads with ``FASTQ_RING_PIN`` = method; and
    the GB/s of one pinned 64 MiB host-to-device copy from a slot (registered memory must copy as fast)."""
    import torch
    from fastq.transfer import PinnedRing

    torch.zeros(1, device="cuda")
    t = time.perf_counter()
    if method == "serial":
        bufs = [torch.empty(mib << 20, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
    else:
        ring = PinnedRing(mib << 20, slots, method=method)
        ring.wait_all()
        bufs = [ring.buffer(k) for k in range(slots)]
    dt = time.perf_counter() - t
    dev = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
    copy = []
    for _ in range(3):
        torch.cuda.synchronize()
        c = time.perf_counter()
        dev.copy_(bufs[0], non_blocking=True)
        torch.cuda.synchronize()
        copy.append((mib << 20) / (time.perf_counter() - c) / 1e9)
    return {"slots": slots, "mib": mib, "method": method, "pin_s": dt, "GBps": slots * (mib << 20) / dt / 1e9,
            "pinned": bool(bufs[0].is_pinned()), "copy_GBps": max(copy)}


def memory_case(case: str, work: Path) -> dict:
    import fastq
    import torch
    import transformers

    torch.zeros(1, device="cuda")
    torch.cuda.memory._record_memory_history(max_entries=200000)
    bnb4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    if case == "pre":
        m = fastq.load(work / "llama7b-nf4", None, {"": 0}, dtype=torch.bfloat16, progress=False)
    elif case == "tf_pre":
        m = transformers.AutoModelForCausalLM.from_pretrained(work / "llama7b-nf4", device_map={"": 0},
                                                              dtype=torch.bfloat16)
    elif case == "cpu":
        m = fastq.load(work / "llama7b", bnb4, {"": 0}, dtype=torch.bfloat16, progress=False, quantize_on="cpu")
    else:
        m = fastq.load(work / "llama7b", bnb4, {"": 0}, dtype=torch.bfloat16, progress=False)
    torch.cuda.synchronize()
    known: dict[int, str] = {}

    def note(t, what):
        if isinstance(t, torch.Tensor) and t.is_cuda:
            known.setdefault(t.untyped_storage().data_ptr(), what)

    for n, p in m.named_parameters():
        note(p.data, n)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for f in ("absmax", "code", "offset"):
                note(getattr(qs, f, None), f"{n}.{f}")
            if qs.state2 is not None:
                note(qs.state2.absmax, f"{n}.state2.absmax")
                note(qs.state2.code, f"{n}.state2.code")
    for n, b in m.named_buffers():
        note(b, n)
    for n, mod in m.named_modules():
        for f in ("quant_state",):
            qs = getattr(mod, f, None)
            if qs is not None and hasattr(qs, "absmax"):
                note(qs.absmax, f"{n}.{f}.absmax")
    snap = torch.cuda.memory._snapshot()
    unknown, stacks, tails = [], Counter(), Counter()
    for seg in snap["segments"]:
        for blk in seg["blocks"]:
            if blk["state"] != "active_allocated":
                continue
            tails[blk["requested_size"]] += blk["size"] - blk["requested_size"]
            if blk["address"] in known:
                continue
            unknown.append(blk["requested_size"])
            frames = [f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']}:{f['name']}"
                      for f in blk.get("frames", []) if f["filename"].endswith(".py")][:6]
            stacks[" <- ".join(frames)] += blk["requested_size"]
    return {
        "case": case,
        "allocated_gb": torch.cuda.memory_allocated() / 1e9,
        "known_gb": sum(s.nbytes() for s in {p.untyped_storage().data_ptr(): p.untyped_storage()
                                            for p in list(m.parameters()) + list(m.buffers()) if p.is_cuda}.values()) / 1e9,
        "unknown_blocks": len(unknown),
        "unknown_mib": sum(unknown) / 2**20,
        "top_stacks": [(s, b / 2**20) for s, b in stacks.most_common(8)],
        "tail_mib": sum(tails.values()) / 2**20,
        "top_tails": [(size, b / 2**20) for size, b in tails.most_common(4)],
        "segments": len(snap["segments"]),
    }


def mapreg_case(work: Path, chunk_mib: int) -> dict:
    """``mapreg`` for one chunk size over every shard of the bf16 checkpoint."""
    import mmap
    import threading

    import numpy as np
    import torch

    cudart = torch.cuda.cudart()
    torch.zeros(1, device="cuda")
    files = sorted((work / "llama7b").glob("*.safetensors"))
    chunk = chunk_mib << 20
    maps, total = [], 0
    for f in files:
        with open(f, "rb") as fh:
            m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
        a = np.frombuffer(m, dtype=np.uint8)
        maps.append((m, a))
        total += len(a)
    jobs = [(a, off, min(chunk, len(a) - off)) for _, a in maps for off in range(0, len(a), chunk)]
    dev = torch.empty(chunk, dtype=torch.uint8, device="cuda")

    def register(a, off, n, flags=8) -> float:  # 8: cudaHostRegisterReadOnly
        t = time.perf_counter()
        rc = int(cudart.cudaHostRegister(a.ctypes.data + off, n, flags))
        if rc:
            raise RuntimeError(f"cudaHostRegister -> {rc}")
        return time.perf_counter() - t

    def unregister(a, off) -> None:
        cudart.cudaHostUnregister(a.ctypes.data + off)

    res = {"chunk_mib": chunk_mib, "GB": total / 1e9}
    try:  # registering alone, then copying alone from registered chunks
        reg = sum(register(a, off, n) for a, off, n in jobs)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for a, off, n in jobs:
            dev[:n].copy_(torch.from_numpy(a[off:off + n]), non_blocking=True)
        torch.cuda.synchronize()
        copy = time.perf_counter() - t
        t = time.perf_counter()
        for a, off, _ in jobs:
            unregister(a, off)
        res.update(register_GBps=total / reg / 1e9, copy_GBps=total / copy / 1e9,
                   unregister_s=time.perf_counter() - t)
        # overlapped: a thread registers chunk k+1.. while chunk k copies; unregistered after its copy
        ready = [threading.Event() for _ in jobs]

        def ahead() -> None:
            for k, (a, off, n) in enumerate(jobs):
                register(a, off, n)
                ready[k].set()

        torch.cuda.synchronize()
        t = time.perf_counter()
        th = threading.Thread(target=ahead)
        th.start()
        evs = []
        for k, (a, off, n) in enumerate(jobs):
            ready[k].wait()
            dev[:n].copy_(torch.from_numpy(a[off:off + n]), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            evs.append(ev)
            if k >= 2:
                evs[k - 2].synchronize()
                unregister(jobs[k - 2][0], jobs[k - 2][1])
        torch.cuda.synchronize()
        res["overlapped_GBps"] = total / (time.perf_counter() - t) / 1e9
        th.join()
        for a, off, _ in jobs[-2:]:
            unregister(a, off)
    except Exception as e:  # noqa: BLE001 - a measurement: say what failed
        res["error"] = repr(e)
    sys.path.insert(0, str(HERE))
    from profile_load import pread_bw

    res["pread16_GBps"] = pread_bw([str(f) for f in files], 16, chunk)
    return res


def sub(args: list[str], env=None, timeout=600) -> dict | None:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, check=False,
                       env={**os.environ, **(env or {})})
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        print(f"FAILED {args} {env} rc={p.returncode}\n{p.stderr[-2000:]}", flush=True)
        return None
    return json.loads(line[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/fastq-gpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--pin", nargs=3)
    ap.add_argument("--memory")
    ap.add_argument("--mapreg", type=int)
    ap.add_argument("what", nargs="*", default=["pin", "ring", "memory"])
    a = ap.parse_args()
    work, out = Path(a.work), Path(a.out)
    if a.pin:
        print("RESULT " + json.dumps(pin_case(int(a.pin[0]), int(a.pin[1]), a.pin[2])), flush=True)
        return
    if a.memory:
        print("RESULT " + json.dumps(memory_case(a.memory, work)), flush=True)
        return
    if a.mapreg:
        print("RESULT " + json.dumps(mapreg_case(work, a.mapreg)), flush=True)
        return
    results = {}
    if "pin" in a.what:
        results["pin"] = [sub([__file__, "--pin", str(s), str(m), how]) for s, m in [(4, 64), (8, 32), (4, 128)]
                          for how in PIN_METHODS]
        for r in results["pin"]:
            print("pin", r, flush=True)
    if "ring" in a.what:
        results["ring"] = []
        for slots, mib, threads in RING_CONFIGS:
            env = {"FASTQ_RING_SLOTS": str(slots), "FASTQ_RING_SLOT_MIB": str(mib), "COMPARE_LOAD_ONLY": "1"}
            if threads:
                env["FASTQ_NUM_THREADS"] = str(threads)
            for case in ("fq_plain", "fq_nf4", "fq_pre"):
                r = sub([str(HERE / "compare.py"), "--work", str(work), "--out", str(out), "--case", case], env)
                if r is None:
                    continue
                row = {"slots": slots, "mib": mib, "threads": threads or "all", "case": case, "load_s": r["load_s"],
                       "phases": r.get("phases"), "ring": {k: (round(v["busy_s"], 3), round(v.get("GBps", 0), 1))
                                                           for k, v in r.get("ring", {}).items()}}
                results["ring"].append(row)
                print("ring", json.dumps(row), flush=True)
    if "memory" in a.what:
        results["memory"] = [sub([__file__, "--work", str(work), "--memory", c]) for c in ("device", "pre", "cpu", "tf_pre")]
        for r in results["memory"]:
            print("memory", json.dumps(r, indent=1), flush=True)
    if "mapreg" in a.what:
        results["mapreg"] = [sub([__file__, "--work", str(work), "--mapreg", str(m)]) for m in (64, 256, 1024)]
        for r in results["mapreg"]:
            print("mapreg", json.dumps(r), flush=True)
    (out / "probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
