"""examples/qlora.py, the script a user copies, runs end to end on a tiny model: adapters train, save,
reload with the same outputs, and merge into a dequantized copy within the rounding of the 4-bit kernels."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "examples" / "qlora.py"


def test_qlora_example_trains_saves_reloads_and_merges(tiny_model, tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), tiny_model("llama"), "--steps", "6", "--batch", "2", "--length", "64",
         "--device", "cpu", "--out", str(tmp_path / "adapters")],
        capture_output=True, text=True, timeout=280, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out.stdout)]
    assert len(losses) >= 2 and all(0 < x < 20 for x in losses)
    assert "reloaded adapters: max |diff| 0\n" in out.stdout
    diff, scale = map(float, re.search(r"merged into the dequantized weights: max \|diff\| ([\d.e-]+) \(scale ([\d.e-]+)", out.stdout).groups())
    assert diff <= 0.05 * scale
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()


def test_qlora_compare_trains_both_loaders_to_the_same_losses(tiny_model, tmp_path):
    """benches/gpu/qlora_compare.py (the GPU run of issue 9) on the CPU: with bitsandbytes' int8 rounded as
    its CUDA kernel rounds it (``conftest.env_as_on_the_gpu``: the script runs each loader in a process
    of its own), as fastq rounds it, the two loaders' losses must be equal step for step."""
    from conftest import env_as_on_the_gpu

    script = Path(__file__).parents[1] / "benches" / "gpu" / "qlora_compare.py"
    out = subprocess.run(
        [sys.executable, str(script), "--model", tiny_model("llama"), "--device", "cpu", "--quant", "int8",
         "--steps", "3", "--batch", "2", "--length", "32", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=280, check=False, env=env_as_on_the_gpu(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    results = json.loads((tmp_path / "qlora_compare.json").read_text())
    ours, theirs = results["fastq:int8"]["losses"], results["transformers:int8"]["losses"]
    assert len(ours) == 3 and all(0 < x < 20 for x in ours)
    assert ours == theirs
    assert "int8: losses max relative difference 0 over 3 steps, 3 steps equal" in out.stdout
