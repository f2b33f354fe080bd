"""The upload's CUDA driver path (rust/core/cuda.rs: libcuda.so.1 opened at run time, the caller's
context made current on the upload thread, copies, events, error names) run on the CPU against a
stand-in driver (tests/fake_cuda/fake_cuda.c, built here with the C compiler Rust links with). Each case
runs in a process of its own: the driver is resolved once per process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).parent

SCRIPT = textwrap.dedent(
    """
    import ctypes, json, sys
    import torch, fastq
    case, path = sys.argv[1], sys.argv[2]
    driver = ctypes.CDLL("libcuda.so.1")  # the stand-in, found through LD_LIBRARY_PATH as fastq finds it
    ck = fastq.open(path)
    dst = {n: torch.zeros(ck.meta(n).nbytes, dtype=torch.uint8) for n in ck.keys()}
    requests = [(d.data_ptr(), d.numel(), [(n, 0, d.numel(), 0)]) for n, d in dst.items()]
    slots = [torch.empty(4096, dtype=torch.uint8).numpy() for _ in range(3)]
    out = {}
    if case != "no-context":
        driver.fake_make_current()  # as torch's CUDA calls leave it on the thread that makes the upload
    try:
        up = fastq._fastq.Upload(ck.native, requests, slots, stream=0x5000, threads=2)
        out["done"] = up.wait()
    except fastq.FastqError as e:
        out["error"] = [type(e).__name__, str(e)]
        up = locals().get("up")
    if up is not None:
        up.cancel()
        out["finished"] = up.finished()
    out["copies"] = driver.fake_copies()
    out["events_live"] = driver.fake_events_live()
    ref = {n: fastq.open(path).get(n).reshape(-1).view(torch.uint8) for n in ck.keys()}
    out["equal"] = [n for n in ck.keys() if torch.equal(dst[n], ref[n])]
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def driver_dir(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in driver")
    d = tmp_path_factory.mktemp("fake_cuda")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "libcuda.so.1"), str(HERE / "fake_cuda" / "fake_cuda.c")],
                   check=True)
    return d


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    tensors = {"a": torch.randn(3000, generator=g), "b": torch.randint(0, 255, (9000,), generator=g, dtype=torch.uint8),
               "c": torch.randn(7, generator=g).to(torch.bfloat16)}
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(tensors, path)
    return path, sorted(tensors)


def run(case: str, driver_dir: Path, path: Path, **env) -> dict:
    environ = dict(os.environ, LD_LIBRARY_PATH=f"{driver_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}", **env)
    r = subprocess.run([sys.executable, "-c", SCRIPT, case, str(path)], env=environ, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_driver_path_copies_every_byte_and_frees_its_events(driver_dir, checkpoint):
    """The upload thread makes the caller's context current (the stand-in refuses copies without it),
    copies each slot's spans through cuMemcpyHtoDAsync, records and waits an event per slot, and destroys
    its events when it ends."""
    path, names = checkpoint
    got = run("ok", driver_dir, path)
    assert got["done"] == len(names) and got["finished"]
    assert sorted(got["equal"]) == names
    assert got["copies"] >= 6  # 48 KB through 4 KiB slots: several slots' copies
    assert got["events_live"] == 0


def test_no_current_context_is_a_device_error(driver_dir, checkpoint):
    path, _ = checkpoint
    got = run("no-context", driver_dir, path)
    assert got["error"][0] == "DeviceError" and "no current CUDA context" in got["error"][1]
    assert got["copies"] == 0


def test_a_refused_copy_is_a_device_error_naming_the_call_and_the_driver_error(driver_dir, checkpoint):
    """The third copy fails: the upload stops, every read in flight ends, and the error names the call
    and CUDA's name for the error (cuGetErrorName)."""
    path, names = checkpoint
    got = run("copy-fails", driver_dir, path, FAKE_CUDA_FAIL_COPY="3")
    assert got["error"] == ["DeviceError", "device: cuMemcpyHtoDAsync: CUDA_ERROR_ILLEGAL_ADDRESS"]
    assert got["finished"] and got["copies"] == 3 and got["events_live"] == 0
    assert sorted(got["equal"]) != names
