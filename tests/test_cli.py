"""The ``fastq`` command, run as users run it (``python -m fastq`` in a subprocess): exit status 2 and one
error for flags that are malformed or contradict each other, 1 and one line for a fastq error, never a
traceback; the progress bar shows no rate before there is one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fastq
import pytest
from fastq.progress import MIN_ELAPSED, byte_bar, shown_rate

#: The fastq under test, whatever the subprocess' working folder.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(fastq.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))


def fastq_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastq", *map(str, args)], check=False, capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def assert_one_error_line(r: subprocess.CompletedProcess, status: int) -> str:
    assert r.returncode == status, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines, "no error printed"
    if lines[0].startswith("usage: fastq"):  # argparse's: usage, then one error line
        assert status == 2 and ": error: " in lines[-1], r.stderr
    else:  # fastq's own: one line, nothing else
        assert len(lines) == 1 and lines[0].startswith("fastq: error: "), r.stderr
    return lines[-1]


# -- usage errors: exit status 2 -------------------------------------------------------------------------

CONVERT = ["convert", "/nonexistent/src", "/nonexistent/dst"]  # flags are checked before the source


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--load-in-4bit", "--load-in-8bit"], "not allowed with"),
        ([], "one of the arguments --load-in-4bit --load-in-8bit is required"),
        (["--load-in-4bit", "--quant-type", "nf5"], "invalid choice"),
        (["--load-in-4bit", "--threads", "-1"], "--threads"),
        (["--load-in-4bit", "--threads", "0"], "--threads"),
        (["--load-in-4bit", "--threads", "many"], "--threads"),
        (["--load-in-4bit", "--max-shard-size", "infGB"], "infGB"),
        (["--load-in-4bit", "--max-shard-size", "nanGB"], "nanGB"),
        (["--load-in-4bit", "--max-shard-size", "five gigs"], "five gigs"),
        (["--load-in-4bit", "--dtype", "float7"], "--dtype 'float7' is not a torch dtype"),
        (["--load-in-4bit", "--dtype", "int8"], "not a floating-point dtype"),
        (["--load-in-4bit", "--blocksize", "7"], "blocksize=7"),
        (["--load-in-8bit", "--threshold", "nan"], "llm_int8_threshold"),
        (["--load-in-4bit", "--compute-dtype", "float7"], "float7"),
    ],
)
def test_usage_errors_exit_2(flags, words):
    line = assert_one_error_line(fastq_cli(*CONVERT, *flags), 2)
    assert words in line, line
    assert "None" not in line


def test_no_command_is_a_usage_error():
    assert_one_error_line(fastq_cli(), 2)


# -- fastq errors: exit status 1 -------------------------------------------------------------------------


@pytest.fixture
def src(tiny_model, tmp_path) -> Path:
    folder = tmp_path / "src"
    shutil.copytree(tiny_model("llama"), folder)
    return folder


def test_missing_source(tmp_path):
    for command in (["inspect"], ["convert"]):
        args = [*command, tmp_path / "nowhere"] + ([tmp_path / "out", "--load-in-8bit"] if command == ["convert"] else [])
        line = assert_one_error_line(fastq_cli(*args), 1)
        assert str(tmp_path / "nowhere") in line


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_broken_config_json(src, tmp_path, command):
    (src / "config.json").write_text('{"architectures": [')
    args = [command, src] + ([tmp_path / "out", "--load-in-4bit"] if command == "convert" else [])
    line = assert_one_error_line(fastq_cli(*args), 1)
    assert str(src / "config.json") in line and "not valid JSON" in line


def test_quantization_config_string(src):
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = "bitsandbytes"
    (src / "config.json").write_text(json.dumps(config))
    line = assert_one_error_line(fastq_cli("inspect", src), 1)
    assert "quantization_config is a JSON string" in line


def test_existing_destination(src, tmp_path):
    (tmp_path / "out").mkdir()
    line = assert_one_error_line(fastq_cli("convert", src, tmp_path / "out", "--load-in-8bit"), 1)
    assert "exists" in line


# -- the progress bar's rate ------------------------------------------------------------------------------


def test_no_rate_before_there_is_one():
    assert shown_rate(0.0, 10**9) is None
    assert shown_rate(1e-6, 10**6) is None  # what read "11.5TB/s"
    assert shown_rate(MIN_ELAPSED / 2, 10**12) is None
    assert shown_rate(MIN_ELAPSED, 0) is None
    assert shown_rate(2.0, 3 * 10**9) == 1.5 * 10**9
    assert shown_rate(MIN_ELAPSED, 10**6) == 10**6 / MIN_ELAPSED


def test_bar_shows_the_rate_shown_rate_gives():
    clock = [100.0]
    bar = byte_bar(10**9, "x", unit_divisor=1000)
    bar.fp = io.StringIO()
    bar._time = lambda: clock[0]
    bar.start_t = bar.last_print_t = clock[0]
    try:
        clock[0] += 1e-4
        bar.update(10**8)
        early = str(bar)
        assert "?B/s" in early and "TB/s" not in early and "<?" in early, early
        clock[0] += 2.0
        bar.update(10**8)
        later = str(bar)
        assert "100MB/s" in later or "99.9MB/s" in later, later
    finally:
        bar.close()
