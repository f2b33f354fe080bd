"""FSDP2 + QLoRA on the CPU: two gloo processes wrap a 4-bit model (``bnb_4bit_quant_storage=bfloat16``,
so packed weights flatten with the others) in ``fully_shard`` and train LoRA adapters; a fastq-loaded
model gives the losses of the transformers-loaded one, step for step."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _losses(folder, which: str) -> list[float]:
    out = subprocess.run([sys.executable, str(WORKER), str(folder), which, _port()], capture_output=True, text=True,
                         timeout=280, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("LOSSES ")]
    assert out.returncode == 0 and line, out.stderr[-3000:]
    return [float(x) for x in line[0].split()[1:]]


@pytest.mark.timeout(600)
def test_fsdp2_qlora_trains_like_transformers(tiny_model):
    folder = tiny_model("llama")
    got, ref = _losses(folder, "fq"), _losses(folder, "tf")
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-6)
    assert got[-1] < got[0]  # the adapters learn
