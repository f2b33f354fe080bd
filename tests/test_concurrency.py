"""Threads and processes: fastq.ops, Checkpoint.quantize and fastq.load from several Python threads at
once give the serial results byte for byte; a forked child (a DataLoader worker) quantizes after its
parent used the worker pool without deadlocking; FASTQ_NUM_THREADS and threads= set the pool's size;
checkpoint tensors the model does not use are reported as transformers reports them."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import fastq
import pytest
import torch
from fastq import _fastq
from safetensors.torch import load_file, save_file


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _weights(n: int = 6):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(64 + 32 * i, 256, generator=g).to(torch.bfloat16) for i in range(n)]


def test_ops_from_several_threads_equal_serial():
    ws = _weights()
    serial = [fastq.ops.quantize_4bit(w, 64, "nf4", True) for w in ws]
    with ThreadPoolExecutor(4) as ex:
        threaded = list(ex.map(lambda w: fastq.ops.quantize_4bit(w, 64, "nf4", True), ws))
    for (p1, s1), (p2, s2) in zip(serial, threaded, strict=True):
        assert _bytes(p1) == _bytes(p2) and _bytes(s1.absmax) == _bytes(s2.absmax)
        assert float(s1.offset) == float(s2.offset)
    int8 = [fastq.ops.quantize_int8(w) for w in ws]
    with ThreadPoolExecutor(4) as ex:
        int8_t = list(ex.map(fastq.ops.quantize_int8, ws))
    assert all(_bytes(a[0]) == _bytes(b[0]) and _bytes(a[1]) == _bytes(b[1]) for a, b in zip(int8, int8_t, strict=True))


def test_checkpoint_quantize_from_two_threads_equals_serial(tiny_model):
    ck = fastq.open(os.path.join(tiny_model("llama"), "model.safetensors"))
    names = [n for n in ck if n.endswith("proj.weight")]
    jobs = [(n, fastq.Spec4bit("nf4", 64, True)) for n in names]

    def run():
        return {n: (_bytes(p), _bytes(s.absmax)) for n, (p, s) in ck.quantize(jobs, threads=2)}

    serial = run()
    with ThreadPoolExecutor(2) as ex:
        a, b = ex.submit(run), ex.submit(run)
        assert a.result() == serial and b.result() == serial


def _state_bytes(model) -> dict[str, bytes]:
    return {k: _bytes(v) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("cfg", [{"load_in_4bit": True, "bnb_4bit_use_double_quant": True}, {"load_in_8bit": True}])
def test_loads_from_several_threads_equal_serial(tiny_model, cfg):
    # Each load builds its skeleton under accelerate's init_empty_weights (a process-wide patch of
    # nn.Module.register_parameter) while the others install weights: 8 loads on 4 threads, every
    # state-dict byte equal to a serial load's. Before install.py set weights through _parameters,
    # weights installed while another thread built its skeleton went to the meta device.
    folder = tiny_model("llama")

    def load():
        return _state_bytes(fastq.load(folder, fastq.QuantConfig(**cfg), "cpu", progress=False))

    serial = load()
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda _: load(), range(8)))
    assert all(r == serial for r in results)


def _child_quantizes(queue) -> None:
    w = _weights(1)[0]
    packed, _ = fastq.ops.quantize_4bit(w, 64, "nf4", True)
    queue.put(_bytes(packed))


def test_forked_child_quantizes_after_the_parent_used_the_pool():
    w = _weights(1)[0]
    parent, _ = fastq.ops.quantize_4bit(w, 64, "nf4", True, threads=2)  # the pool ran here first
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_quantizes, args=(queue,))
    child.start()
    child.join(120)  # generous: a deadlock never ends, a slow machine does
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive, "the forked child hung"
    assert child.exitcode == 0 and queue.get(timeout=10) == _bytes(parent)


def test_thread_counts_are_honoured():
    assert _fastq.thread_count(3) == 3
    env = {**os.environ, "FASTQ_NUM_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", "from fastq import _fastq; print(_fastq.thread_count(), _fastq.thread_count(5))"],
                         capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.split() == ["3", "5"]
    env["FASTQ_NUM_THREADS"] = "0"  # not a count: every core
    out = subprocess.run([sys.executable, "-c", "import os; from fastq import _fastq; print(_fastq.thread_count() == os.cpu_count())"],
                         capture_output=True, text=True, env=env, timeout=120, check=True)
    assert out.stdout.strip() == "True"


def test_unused_checkpoint_tensors_are_reported(tiny_model, tmp_path, caplog):
    folder = tmp_path / "extra"
    shutil.copytree(tiny_model("llama"), folder)
    path = os.path.join(folder, "model.safetensors")
    t = load_file(path)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(t, path, metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="fastq"):
        fastq.load(folder, fastq.QuantConfig(load_in_4bit=True), "cpu", progress=False)
    assert "1 checkpoint tensor(s) are not used by the model: model.layers.0.self_attn.rotary_emb.inv_freq" in caplog.text


def test_no_report_when_every_tensor_is_used(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="fastq"):
        fastq.load(tiny_model("llama"), fastq.QuantConfig(load_in_4bit=True), "cpu", progress=False)
    assert "not used by the model" not in caplog.text


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_argument_gives_the_same_bytes(threads):
    w = _weights(1)[0]
    a, _ = fastq.ops.quantize_4bit(w, 64, "nf4", True, threads=threads)
    b, _ = fastq.ops.quantize_4bit(w, 64, "nf4", True, threads=1, reference=True)
    assert _bytes(a) == _bytes(b)
