"""The ``fastq`` command, run as users run it (``python -m fastq`` in a subprocess): exit status 2 and one
error for flags that are malformed or contradict each other, 1 and one line for a fastq error, never a
traceback; ``--help`` and ``inspect`` (estimates included) import none of torch, transformers and
bitsandbytes; bitsandbytes' kernels warning is not printed; the progress bar shows no rate before there is one.
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
HEAVY = ("torch", "transformers", "bitsandbytes")


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


# -- start-up: what the commands import -----------------------------------------------------------------

#: Runs ``python -m fastq ARGS`` in this interpreter, then prints which of HEAVY it imported.
PROBE = (
    "import json, runpy, sys\n"
    "sys.argv = ['fastq', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('fastq', run_name='__main__', alter_sys=True)\n"
    "except SystemExit as e:\n"
    "    status = e.code\n"
    f"print(json.dumps([status, sorted(m for m in {HEAVY!r} if m in sys.modules)]), file=sys.stderr)\n"
)


def imported_by(*args) -> tuple[int, list[str], str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], check=False, capture_output=True,
                       text=True, env=ENV, timeout=300)
    status, heavy = json.loads(r.stderr.strip().splitlines()[-1])
    return status, heavy, r.stdout


@pytest.mark.parametrize("args", [["--help"], ["convert", "--help"], ["inspect", "--help"]])
def test_help_imports_no_heavy_library(args):
    status, heavy, out = imported_by(*args)
    assert status == 0 and "usage: fastq" in out
    assert heavy == [], f"fastq {' '.join(args)} imported {heavy}"


def test_inspect_without_estimates_imports_no_heavy_library(tiny_model):
    status, heavy, out = imported_by("inspect", tiny_model("llama"), "--no-estimate")
    assert status == 0 and "21 tensors" in out
    assert heavy == []


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_inspect_with_estimates_imports_no_heavy_library(tiny_model, family):
    """The estimates come from the headers (fastq/estimate.py): no model is built."""
    status, heavy, out = imported_by("inspect", tiny_model(family))
    assert status == 0 and "estimated from the headers" in out and "4-bit nf4, double quant" in out
    assert heavy == []


def test_inspect_exact_builds_the_model(tiny_model):
    status, heavy, out = imported_by("inspect", tiny_model("llama"), "--exact")
    assert status == 0 and "exact, from the built model" in out
    assert set(heavy) == set(HEAVY)


def test_inspect_of_a_converted_checkpoint_imports_no_heavy_library(tiny_model, tmp_path):
    dst = fastq.convert(tiny_model("llama"), tmp_path / "out", fastq.QuantConfig(load_in_8bit=True), progress=False)
    status, heavy, out = imported_by("inspect", dst, "--verify")
    assert status == 0 and "llm_int8" in out and "all verified" in out
    assert heavy == []


def test_lazy_package_exports_every_name():
    code = (
        "import sys, fastq\n"
        "assert 'torch' not in sys.modules\n"
        "from fastq import *\n"
        "g = globals()\n"
        "missing = [n for n in fastq.__all__ if n not in g]\n"
        "from fastq.convert import parse_size\n"  # the submodule must not hide the function
        "from fastq.save import save as _\n"
        "print(missing, callable(fastq.convert), callable(fastq.save), fastq.ops.__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]", "True", "True", "fastq.ops"]


# -- bitsandbytes' kernels-community warning -------------------------------------------------------------


def test_no_kernels_community_warning(tiny_model, tmp_path):
    from fastq.logs import BNB_KERNELS_MESSAGE

    plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], check=False, capture_output=True,
                           text=True, env=ENV, timeout=300)
    if BNB_KERNELS_MESSAGE not in plain.stderr:
        pytest.skip("bitsandbytes does not print the warning here (no AVX512-BF16, or `kernels` installed)")
    r = fastq_cli("convert", tiny_model("llama"), tmp_path / "out", "--load-in-4bit", "--quiet")
    assert r.returncode == 0, r.stderr
    assert BNB_KERNELS_MESSAGE not in r.stderr and "kernels" not in r.stderr, r.stderr


@pytest.mark.parametrize("use", [
    "fastq.ops.quantize_4bit(torch.randn(64, 64), 64, 'nf4', False)",
    "import bitsandbytes",
], ids=["ops", "bitsandbytes-after-fastq"])
def test_no_kernels_community_warning_from_the_library(use):
    """``import fastq`` installs the filter: the library's own calls, and bitsandbytes imported by the
    user after fastq, print no warning either."""
    from fastq.logs import BNB_KERNELS_MESSAGE

    plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], check=False, capture_output=True,
                           text=True, env=ENV, timeout=300)
    if BNB_KERNELS_MESSAGE not in plain.stderr:
        pytest.skip("bitsandbytes does not print the warning here (no AVX512-BF16, or `kernels` installed)")
    r = subprocess.run([sys.executable, "-c", f"import fastq, torch; {use}; print('done')"], check=False,
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr
    assert BNB_KERNELS_MESSAGE not in r.stderr and "kernels" not in r.stderr, r.stderr


def test_other_bitsandbytes_messages_pass():
    import logging

    from fastq.logs import BNB_CPU_LOGGER, BNB_KERNELS_MESSAGE, quiet_bitsandbytes

    quiet_bitsandbytes()
    quiet_bitsandbytes()  # once is enough; twice adds nothing
    logger = logging.getLogger(BNB_CPU_LOGGER)
    assert len(logger.filters) == 1
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        logger.warning(BNB_KERNELS_MESSAGE + ": %s. Please make sure ...", "No module named 'kernels'")
        logger.warning("another message")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["another message"]


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


def test_quantize_experts_is_refused_by_convert(src, tmp_path):
    line = assert_one_error_line(fastq_cli("convert", src, tmp_path / "out", "--load-in-4bit", "--quantize-experts"), 1)
    assert "quantize_experts has no checkpoint format" in line
    assert not (tmp_path / "out").exists()
