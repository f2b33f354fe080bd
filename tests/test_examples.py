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
