"""``fastq convert`` / ``fastq.convert`` / ``fastq.save`` against transformers + bitsandbytes (CPU).

The reference for every conversion is what transformers itself writes: ``from_pretrained`` of the same
tiny source with the same ``BitsAndBytesConfig`` and ``device_map="cpu"``, then ``save_pretrained``
(before any forward pass: bitsandbytes' CPU backend repacks 4-bit weights on first use). fastq's folder
must hold the same files byte for byte - shards, index, config.json, generation_config.json - and
``from_pretrained(DST)`` must give the same logits as the reference model.

FP4 is one exception: fastq's codes follow bitsandbytes' CUDA kernel, from which its CPU kernel differs
(``conftest.cpu_codes_apart_by_rule``; packed weights compared code by code, logits within 5% of their
scale). Double quantization is the other: fastq's nested 8-bit codes follow bitsandbytes' CUDA kernel
(what a GPU-quantized checkpoint holds) while its CPU kernel rounds ~0.2% of them one step the other way
through a lookup table, and its offset is the GPU's float32 mean, a few ulps from the CPU's. There
every tensor but the nested statistics is compared byte for byte, the codes (``*.weight.absmax``)
within one step on at most 1% of entries, the offset and nested absmax within a few ulps
(``conftest.nested_stat_close``), and the logits within 1% of their scale
(one code step moves one 64-weight block's scale by a fraction of a percent). A shard of a
double-quantized model also orders its tensors differently from safetensors' (the ``quant_state`` JSON,
whose length is only known after quantizing, goes last), so its files are compared tensor by tensor.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fastq
import numpy as np
import pytest
import torch
import transformers
from conftest import (
    FAMILIES,
    VOCAB,
    assert_close_outputs,
    assert_quantized_tensors_match,
    auto_class,
    tensor_bytes,
)
from fastq import _fastq
from fastq.atomic import temp_folder
from fastq.errors import UnsavableModelError
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig

pytestmark = [pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast from:UserWarning")]

CONFIGS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "nf4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
    "fp4-bf16-storage": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_quant_storage": torch.bfloat16},
    "nf4-f16-storage": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_quant_storage": torch.float16},
    "nf4-f32-storage": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_quant_storage": torch.float32},
    "nf4-skip": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "llm_int8_skip_modules": ["lm_head", "down_proj", "fc2", "wo"]},
}
AUTO = {family: auto_class(family) for family in FAMILIES}
MATRIX = [(f, c) for f in AUTO for c in ("nf4", "int8", "nf4-dq")] + [
    ("llama", "fp4"), ("gpt2", "fp4"), ("llama", "fp4-bf16-storage"), ("llama", "nf4-skip"), ("opt", "nf4-skip"),
    ("llama", "nf4-f16-storage"), ("llama", "nf4-f32-storage"),
]


def bnb(name: str) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(**CONFIGS[name])


def inputs(family: str) -> dict:
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "decoder_input_ids": ids[:, :5]} if family == "t5" else {"input_ids": ids}


def outputs(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs(family))
    return out.last_hidden_state if family == "bert" else out.logits


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    return out


def assert_same_files(ref, got, double_quant: bool = False, fp4: bool = False) -> None:
    """Every file transformers wrote is in ``got`` with the same bytes (shards tensor by tensor with
    double quant or FP4, see the module docstring); fastq adds only its manifest."""
    names = sorted(os.listdir(ref))
    assert sorted(set(os.listdir(got)) - {"fastq-manifest.json"}) == names
    tensorwise = double_quant or fp4
    for name in names:
        if tensorwise and name.endswith(".safetensors"):
            continue
        assert filecmp.cmp(Path(ref, name), Path(got, name), shallow=False), f"{name} differs"
    if not tensorwise:
        return
    a, b = tensors(ref), tensors(got)
    assert set(a) == set(b)
    index = json.loads(Path(ref, "model.safetensors.index.json").read_text()) if "model.safetensors.index.json" in names else None
    assert_quantized_tensors_match(a, b, double_quant)
    if index is not None:
        assert json.loads(Path(got, "model.safetensors.index.json").read_text()) == index


@pytest.fixture(scope="session")
def transformers_saved(tiny_model, tmp_path_factory):
    """``(family, config, max_shard_size) -> (folder, outputs)``: transformers' quantized save of the tiny
    model, and the quantized model's outputs (computed after saving)."""
    cache = {}

    def make(family: str, name: str, max_shard_size: str = "5GB"):
        key = (family, name, max_shard_size)
        if key not in cache:
            src = tiny_model(family)
            model = AUTO[family].from_pretrained(src, quantization_config=bnb(name), device_map="cpu")
            folder = tmp_path_factory.mktemp(f"tf-{family}-{name}")
            model.save_pretrained(folder, max_shard_size=max_shard_size)
            cache[key] = (folder, outputs(model, family))
        return cache[key]

    return make


# -- format: byte for byte what transformers writes, and what it loads ----------------------------------


@pytest.mark.parametrize(("family", "name"), MATRIX, ids=[f"{f}-{n}" for f, n in MATRIX])
def test_convert_equals_transformers(tiny_model, transformers_saved, tmp_path, family, name):
    ref_dir, ref_out = transformers_saved(family, name)
    dst = fastq.convert(tiny_model(family), tmp_path / "out", bnb(name), progress=False)
    fp4 = name.startswith("fp4")
    assert_same_files(ref_dir, dst, double_quant=name.endswith("-dq"), fp4=fp4)
    # transformers loads the converted folder with no quantization argument, and fastq.load reads it as
    # a pre-quantized checkpoint
    for got in (AUTO[family].from_pretrained(dst, device_map="cpu"), fastq.load(dst, None, "cpu", progress=False)):
        if fp4:
            assert_close_outputs(ref_out, outputs(got, family), share=0.05)
        elif name.endswith("-dq"):
            assert_close_outputs(ref_out, outputs(got, family))
        else:
            assert torch.equal(outputs(got, family), ref_out)


@pytest.mark.parametrize(("family", "name"), [("llama", "nf4"), ("gpt2", "int8"), ("t5", "nf4"), ("bert", "nf4-dq")])
def test_sharded_convert_equals_transformers(tiny_model, transformers_saved, tmp_path, family, name):
    """Several shards: transformers' split (oversized tensors alone, placed first) and its index."""
    ref_dir, _ = transformers_saved(family, name, "100KB")
    dst = fastq.convert(tiny_model(family), tmp_path / "out", bnb(name), max_shard_size="100KB", progress=False)
    assert len(list(Path(dst).glob("model-*-of-*.safetensors"))) > 2
    assert_same_files(ref_dir, dst, double_quant=name.endswith("-dq"))


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_convert_casts_like_transformers(tiny_model, tmp_path, name):
    """A float32 checkpoint converted as bfloat16: weights are cast before quantizing, as transformers does."""
    src = tiny_model("gpt2", torch.float32)
    ref = AUTO["gpt2"].from_pretrained(src, quantization_config=bnb(name), device_map="cpu", dtype=torch.bfloat16)
    ref.save_pretrained(tmp_path / "ref")
    dst = fastq.convert(src, tmp_path / "out", bnb(name), dtype=torch.bfloat16, progress=False)
    assert_same_files(tmp_path / "ref", dst)


def test_side_files_without_generation_config(tiny_model, tmp_path):
    """No generation_config.json in the source: transformers builds one from config.json; tokenizer and
    other files are copied; weights of other formats are not."""
    src = tmp_path / "src"
    shutil.copytree(tiny_model("opt"), src)
    (src / "generation_config.json").unlink()
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "pytorch_model.bin").write_bytes(b"stale")
    ref = AUTO["opt"].from_pretrained(src, quantization_config=bnb("int8"), device_map="cpu")
    ref.save_pretrained(tmp_path / "ref")
    shutil.copy(src / "tokenizer.json", tmp_path / "ref" / "tokenizer.json")
    dst = fastq.convert(src, tmp_path / "out", bnb("int8"), progress=False)
    assert_same_files(tmp_path / "ref", dst)


def test_keep_in_fp32_modules_load_in_transformers(tiny_model, tmp_path):
    """accelerate's keep_in_fp32_modules is not a BitsAndBytesConfig field: the converted config lists the
    unquantized modules in llm_int8_skip_modules, so transformers builds the same modules as fastq.load."""
    cfg = fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", keep_in_fp32_modules=["down_proj"])
    dst = fastq.convert(tiny_model("llama"), tmp_path / "out", cfg, progress=False)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["down_proj", "lm_head"]
    assert qc["fastq"]["keep_in_fp32_modules"] == ["down_proj"]
    ours = fastq.load(dst, None, "cpu", progress=False)
    theirs = AUTO["llama"].from_pretrained(dst, device_map="cpu")
    assert {n: type(m) for n, m in ours.named_modules()} == {n: type(m) for n, m in theirs.named_modules()}
    assert ours.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(tensor_bytes(a[k]), tensor_bytes(b[k])) for k in a)


def test_other_blocksize_loads_in_transformers(tiny_model, tmp_path):
    """BitsAndBytesConfig has no block size, but Params4bit.from_prequantized reads it from each weight's
    quant_state, so a 128-block conversion loads in transformers; its codes are bitsandbytes'."""
    from bitsandbytes.functional import quantize_4bit

    src = tiny_model("llama")
    cfg = fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", blocksize=128)
    dst = fastq.convert(src, tmp_path / "out", cfg, progress=False)
    name = "model.layers.0.mlp.up_proj.weight"
    with safe_open(Path(src) / "model.safetensors", "pt") as st:
        packed, state = quantize_4bit(st.get_tensor(name), blocksize=128, quant_type="nf4", compress_statistics=False)
    got = tensors(dst)
    assert torch.equal(got[name], packed) and torch.equal(got[name + ".absmax"], state.absmax)
    theirs = AUTO["llama"].from_pretrained(dst, device_map="cpu")
    assert torch.equal(outputs(theirs, "llama"), outputs(fastq.load(dst, None, "cpu", progress=False), "llama"))


def test_quant_state_json_and_float_repr_match_bitsandbytes():
    from bitsandbytes.functional import QuantState

    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-45, 38, 20000),
        np.array([0.0, -0.0, 1.0, 1e-5, 1e-4, 1e16, 1e15, 3.4028235e38, 1.4e-45, np.inf, -np.inf], np.float32),
    ])
    for v in values:
        assert _fastq.py_float_repr(float(v)) == json.dumps(float(v)), v
    for qt, dtype, shape, offset in [("nf4", torch.bfloat16, (128, 384), 0.0736732), ("fp4", torch.float16, (7, 3), None)]:
        state = QuantState(
            absmax=torch.zeros(4), shape=torch.Size(shape), code=torch.zeros(16), blocksize=64, quant_type=qt, dtype=dtype,
            offset=None if offset is None else torch.tensor(offset, dtype=torch.float32),
            state2=None if offset is None else QuantState(absmax=torch.zeros(1), code=torch.zeros(256), blocksize=256, dtype=torch.float32),
        )
        want = bytes(state.as_dict(packed=True)[f"quant_state.bitsandbytes__{qt}"].numpy())
        dt = {torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
        assert _fastq.quant_state_json(qt, 64, dt, list(shape), offset).encode() == want


# -- fastq.save and accelerate's save_model on fastq-loaded models ------------------------------------


@pytest.mark.parametrize(("family", "name"), [("llama", "nf4"), ("llama", "int8"), ("gpt2", "nf4"), ("t5", "int8")])
def test_save_roundtrip(tiny_model, transformers_saved, tmp_path, family, name):
    ref_dir, ref_out = transformers_saved(family, name)
    model = fastq.load(tiny_model(family), bnb(name), "cpu", progress=False)
    out = fastq.save(model, tmp_path / "saved")
    assert_same_files(ref_dir, out)  # the same bytes as transformers' save (and as fastq.convert)
    assert torch.equal(outputs(AUTO[family].from_pretrained(out, device_map="cpu"), family), ref_out)
    assert torch.equal(outputs(fastq.load(out, None, "cpu", progress=False), family), ref_out)
    with pytest.raises(fastq.OutputExistsError):
        fastq.save(model, out)
    fastq.save(model, out, "100KB", overwrite=True)
    assert len(list(Path(out).glob("model-*-of-*.safetensors"))) > 2
    assert not temp_folder(out).exists()


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_accelerate_save_model_reads_back(tiny_model, tmp_path, name):
    """accelerate's guide: ``Accelerator().save_model(model, dir)``, then reload the weights into an empty
    model with the same quantization config (``load_and_quantize_model``), or with config.json beside
    them, ``fastq.load(dir)``."""
    from accelerate import Accelerator, init_empty_weights

    src = tiny_model("llama")
    model = fastq.load(src, bnb(name), "cpu", progress=False)
    out = tmp_path / "acc"
    Accelerator().save_model(model, out)  # before any forward pass (see test_save_refuses_a_repacked_model)
    want = outputs(model, "llama")
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    with init_empty_weights():
        config = transformers.AutoConfig.from_pretrained(src)
        empty = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    again = fastq.load_and_quantize_model(empty, bnb(name), weights_location=out, device_map="cpu")
    assert torch.equal(outputs(again, "llama"), want)
    model.config.to_json_file(out / "config.json")  # carries quantization_config
    assert torch.equal(outputs(fastq.load(out, None, "cpu", progress=False), "llama"), want)


def test_save_refuses_a_repacked_model(tiny_model, tmp_path):
    """After a CPU forward pass bitsandbytes 0.50.2 holds absmax as transposed bfloat16 and its state dict
    keeps it that way: a checkpoint saved then reloads to different logits. fastq.save refuses. (It
    repacks only on a CPU with AVX512-BF16: elsewhere the forward leaves the weights as they are.)"""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights for its CPU kernel only with AVX512-BF16")
    model = fastq.load(tiny_model("llama"), bnb("nf4"), "cpu", progress=False)
    outputs(model, "llama")
    with pytest.raises(UnsavableModelError, match="repacked"):
        fastq.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not temp_folder(tmp_path / "out").exists()


# -- atomic, resumable, cancellable -----------------------------------------------------------------


def make_llama(folder: Path, layers: int = 12, hidden: int = 512, seed: int = 0) -> Path:
    """A Llama checkpoint of random bf16 weights (~100 MB at the defaults), written directly."""
    cfg = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
    )
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    weights = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def manifest_shards(tmp: Path) -> int:
    try:
        return len(json.loads((tmp / "fastq-manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


#: ``python -m fastq`` with Python's Ctrl-C handler installed, however the tests were started. A process
#: started with SIGINT ignored (a background job of a non-interactive shell:
#: ``bash -c "trap '' INT; make test-py"``) passes that on to its children, and Python installs no
#: KeyboardInterrupt handler in a child that starts with SIGINT ignored; from a terminal it does.
CLI = (
    "import runpy, signal\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "runpy.run_module('fastq', run_name='__main__', alter_sys=True)\n"
)


def start_cli(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-c", CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_shards(proc: subprocess.Popen, tmp: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while manifest_shards(tmp) < n:
        assert proc.poll() is None, "the conversion ended before it could be interrupted: " + proc.stderr.read()
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.002)


CONVERT = ["--load-in-4bit", "--quant-type", "nf4", "--max-shard-size", "1MB", "--threads", "1"]


def kill_after_shards(src: Path, dst: Path, n: int = 3) -> Path:
    """Starts ``fastq convert SRC DST`` (CONVERT's flags), SIGKILLs it once ``n`` shards are finished;
    returns its temporary folder."""
    tmp = temp_folder(dst)
    proc = start_cli("convert", src, dst, *CONVERT)
    wait_for_shards(proc, tmp, n)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return tmp


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("big") / "src")


@pytest.fixture(scope="module")
def big_reference(big_source, tmp_path_factory):
    """The uninterrupted conversion of ``big_source`` (same flags as the CLI runs below)."""
    dst = tmp_path_factory.mktemp("ref") / "out"
    cfg = fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    return fastq.convert(big_source, dst, cfg, max_shard_size="1MB", threads=1, progress=False)


def assert_identical_folders(a: Path, b: Path) -> None:
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_kill_then_resume(big_source, big_reference, tmp_path):
    dst = tmp_path / "out"
    tmp = kill_after_shards(big_source, dst)
    assert not dst.exists(), "a killed conversion must not leave a finished-looking folder"
    kept = manifest_shards(tmp)
    assert kept >= 3
    # a finished shard damaged after the kill is found by its checksum and written again
    first = min(tmp.glob("model-*.safetensors"))
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    proc = start_cli("convert", big_source, dst, *CONVERT, "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    resumed = int(err.split("resuming, ")[1].split(" of ")[0])
    assert kept - 1 <= resumed < kept + 1 and resumed >= 2, err
    assert not tmp.exists()
    assert_identical_folders(big_reference, dst)


def test_ctrl_c_exits_cleanly_and_resumes(big_source, big_reference, tmp_path):
    dst = tmp_path / "out"
    proc = start_cli("convert", big_source, dst, *CONVERT)
    wait_for_shards(proc, temp_folder(dst), 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not dst.exists()
    assert manifest_shards(temp_folder(dst)) >= 2
    fastq.convert(big_source, dst, fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                  max_shard_size="1MB", threads=1, resume=True, progress=False)
    assert_identical_folders(big_reference, dst)


def test_gil_is_released_while_converting(big_source, tmp_path):
    done = threading.Event()
    ticks = 0

    def run():
        fastq.convert(big_source, tmp_path / "out", fastq.QuantConfig(load_in_8bit=True), progress=False)
        done.set()

    t = threading.Thread(target=run)
    start = time.monotonic()
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    t.join()
    elapsed = time.monotonic() - start
    assert ticks > 0.2 * elapsed / 0.001, f"the main thread ran {ticks} times in {elapsed:.2f} s"


def test_resume_refuses_other_parameters(big_source, tmp_path):
    dst = tmp_path / "out"
    proc = start_cli("convert", big_source, dst, *CONVERT)
    wait_for_shards(proc, temp_folder(dst), 1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    with pytest.raises(fastq.InvalidArgumentError, match="other parameters"):
        fastq.convert(big_source, dst, fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
                      max_shard_size="1MB", resume=True, progress=False)
    assert not dst.exists()


def test_existing_destination(tiny_model, tmp_path):
    src = tiny_model("llama")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep").write_text("x")
    with pytest.raises(fastq.OutputExistsError):
        fastq.convert(src, dst, bnb("nf4"), progress=False)
    assert (dst / "keep").exists()
    fastq.convert(src, dst, bnb("nf4"), progress=False, overwrite=True)
    assert not (dst / "keep").exists() and (dst / "model.safetensors").exists()
    assert not temp_folder(dst).exists()
    with pytest.raises(fastq.ConfigError, match="already quantized"):
        fastq.convert(dst, tmp_path / "again", bnb("nf4"), progress=False)


def test_two_conversions_into_one_destination(tiny_model, tmp_path):
    # Another process holds the destination's temporary folder (as a running conversion does): a second
    # conversion stops at once with ConversionLockedError, writes nothing and leaves the other's folder;
    # once the other is gone it runs. The child says when it holds the lock: no timing involved.
    src, dst = tiny_model("llama"), tmp_path / "out"
    hold = ("import sys; from pathlib import Path; from fastq.atomic import lock_temp_folder; "
            "lock = lock_temp_folder(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(dst)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(fastq.ConversionLockedError, match="another conversion"):
            fastq.convert(src, dst, bnb("nf4"), progress=False)
        assert not dst.exists() and temp_folder(dst).is_dir()  # the other conversion's folder stays
    finally:
        holder.communicate("", timeout=60)
    fastq.convert(src, dst, bnb("nf4"), progress=False)
    assert (dst / "model.safetensors").exists() and not temp_folder(dst).exists()


# -- bad input: a clear fastq error, no output -------------------------------------------------------


def broken_copy(tiny_model, tmp_path, family="llama") -> Path:
    src = tmp_path / "src"
    shutil.copytree(tiny_model(family), src)
    return src


def assert_no_output(dst: Path) -> None:
    assert not dst.exists() and not temp_folder(dst).exists()


def test_truncated_shard(tiny_model, tmp_path):
    src = broken_copy(tiny_model, tmp_path)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(fastq.TruncatedShardError) as e:
        fastq.convert(src, tmp_path / "out", bnb("nf4"), progress=False)
    assert e.value.path == str(f)
    assert_no_output(tmp_path / "out")


def test_missing_shard(tiny_model, tmp_path):
    src = broken_copy(tiny_model, tmp_path)
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    with safe_open(src / "model-00001-of-00002.safetensors", "pt") as st:
        keys = list(st.keys())
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys}
    weight_map["extra.weight"] = "model-00002-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(fastq.MissingFileError, match="model-00002-of-00002"):
        fastq.convert(src, tmp_path / "out", bnb("nf4"), progress=False)
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_nan_weight(tiny_model, tmp_path, name):
    src = broken_copy(tiny_model, tmp_path)
    with safe_open(src / "model.safetensors", "pt") as st:
        weights = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    bad = "model.layers.1.mlp.up_proj.weight"
    weights[bad][3, 7] = float("nan")
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(fastq.NonFiniteError) as e:
        fastq.convert(src, tmp_path / "out", bnb(name), progress=False)
    assert e.value.tensor == bad and e.value.path == str(src / "model.safetensors")
    assert_no_output(tmp_path / "out")


def test_full_disk(tiny_model, tmp_path):
    """A write that fails (here: the file-size limit, as a full disk would) is a FastqIOError naming the
    shard; nothing that looks like a checkpoint is left."""
    code = (
        "import resource, signal, sys, fastq\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "try:\n"
        "    fastq.convert(sys.argv[1], sys.argv[2], fastq.QuantConfig(load_in_8bit=True), progress=False)\n"
        "except fastq.FastqIOError as e:\n"
        "    print(type(e).__name__, e.path)\n"
    )
    dst = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", code, tiny_model("llama"), dst], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["FastqIOError", str(temp_folder(dst) / "model.safetensors")]
    assert_no_output(dst)


def test_parse_size():
    from fastq.convert import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size(" 1.5 kb") == 1500
    assert parse_size("2GiB") == 2 << 30 and parse_size(1234) == 1234 and parse_size("77") == 77
    for bad in ("5 parsecs", "-1GB", "0", 0):
        with pytest.raises(fastq.ConfigError):
            parse_size(bad)


# -- the command line -----------------------------------------------------------------------------------


def test_cli_convert_and_inspect(tiny_model, transformers_saved, tmp_path):
    src = tiny_model("llama")
    ref_dir, _ = transformers_saved("llama", "nf4-dq")
    dst = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "fastq", "convert", src, dst, "--load-in-4bit", "--quant-type", "nf4",
         "--double-quant", "--quiet"], check=False, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert_same_files(ref_dir, dst, double_quant=True)
    r = subprocess.run([sys.executable, "-m", "fastq", "inspect", dst, "--json", "--verify"], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["quantization"]["method"] == "nf4"
    assert report["quantization"]["4bit_weights"] == {"nf4": 14}
    assert set(report["manifest"]["verified"].values()) == {True}
    assert report["dtypes"]["U8"]["tensors"] == 3 * 14
    # the source's estimates are the sizes of what convert writes
    r = subprocess.run([sys.executable, "-m", "fastq", "inspect", src, "--json"], check=False, capture_output=True, text=True)
    est = json.loads(r.stdout)["memory"]
    # (with double quant the quant_state JSON's length is bounded before quantizing: <= 24 bytes per weight)
    assert 0 <= est["4-bit nf4, double quant"] - report["total_bytes"] <= 24 * 14
    nodq = fastq.convert(src, tmp_path / "nodq", bnb("nf4"), progress=False)
    assert est["4-bit nf4"] == sum(v.nbytes for v in tensors(nodq).values())
    r = subprocess.run([sys.executable, "-m", "fastq", "convert", src, dst, "--load-in-8bit"], check=False, capture_output=True, text=True)
    assert r.returncode == 1 and "exists" in r.stderr and "Traceback" not in r.stderr


# -- resume after a source changed in place -------------------------------------------------------------


def test_resume_after_a_source_changed_in_place_with_its_mtime_restored(big_source, tmp_path):
    """``cp -p`` and ``rsync -a`` put the old mtime back on new bytes, so the size and mtime in the
    conversion's parameters still match: only the manifest's record of each shard's source bytes
    (rust/core/writer/sources.rs) can tell that finished shards were made from the old bytes."""
    src = tmp_path / "src"
    shutil.copytree(big_source, src)
    dst = tmp_path / "out"
    tmp = kill_after_shards(src, dst)
    made_from = set()
    for name in json.loads((tmp / "fastq-manifest.json").read_text())["shards"]:
        with safe_open(tmp / name, "pt") as f:
            made_from |= set(f.keys())
    victims = [n for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight")
               if {n, n.removeprefix("model.")} & made_from]  # source name, or as the output names it
    assert victims, f"no finished shard holds the tensors this test changes: {sorted(made_from)}"
    weights = src / "model.safetensors"
    before = os.stat(weights)
    with open(weights, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        for v in victims:
            f.seek(8 + n + header[v]["data_offsets"][0])
            chunk = bytearray(f.read(4096))
            chunk[1::2] = bytes(b ^ 0x80 for b in chunk[1::2])  # flip the sign of 2048 bf16 values
            f.seek(-len(chunk), os.SEEK_CUR)
            f.write(chunk)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(weights)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    cfg = fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    fastq.convert(src, dst, cfg, max_shard_size="1MB", threads=1, resume=True, progress=False)
    fresh = fastq.convert(src, tmp_path / "fresh", cfg, max_shard_size="1MB", threads=1, progress=False)
    assert_identical_folders(fresh, dst)
