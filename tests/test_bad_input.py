"""Bad inputs and failed writes give typed errors that name the file, never a bare traceback, and leave
nothing behind.

The inputs are a tiny seeded checkpoint (conftest's ``tiny_model``) with one thing broken: config.json
empty, not JSON, not an object, with a ``quantization_config`` that is a string or another library's, a
folder where a file belongs, a shape that overflows. The write failures are simulated: a file whose
writes fail with ENOSPC (what a full disk gives), a folder where nothing can be created (what a
read-only destination gives), a per-process file-size limit.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fastq
import pytest
from fastq.atomic import temp_folder
from fastq.inspect import inspect_checkpoint

INT8 = fastq.QuantConfig(load_in_8bit=True)
NF4 = fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")


@pytest.fixture
def src(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny Llama checkpoint, to break."""
    folder = tmp_path / "src"
    shutil.copytree(tiny_model("llama"), folder)
    return folder


def edit_config(folder: Path, **changes) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return path


def assert_nothing_left(dst: Path) -> None:
    assert not os.path.lexists(dst), f"{dst} was written"
    assert not temp_folder(dst).exists(), "the temporary folder was left behind"
    assert not (dst.parent / f".{dst.name}.fastq-old").exists()


#: Every entry point that reads a checkpoint's config.json.
READERS = {
    "load": lambda path: fastq.load(path, NF4, "cpu", progress=False),
    "convert": lambda path: fastq.convert(path, Path(path).parent / "out", NF4, progress=False),
    "inspect": lambda path: inspect_checkpoint(path),
}


def raises_naming(cls, path: Path, reader: str):
    """Runs ``READERS[reader]`` and checks it raises ``cls`` naming ``path`` (message and ``.path``)."""
    with pytest.raises(cls) as e:
        READERS[reader](path.parent if path.name == "config.json" else path)
    assert str(path) in str(e.value), str(e.value)
    assert e.value.path == str(path)
    return e.value


# -- config.json -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "empty"),
        (b"  \n", "empty"),
        (b'{"architectures": ["LlamaForCausalLM"', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "a JSON list"),
        (b'"LlamaForCausalLM"', "a JSON string"),
    ],
)
def test_broken_config_json(src, reader, data, words):
    path = src / "config.json"
    path.write_bytes(data)
    e = raises_naming(fastq.ConfigFileError, path, reader)
    assert isinstance(e, fastq.ConfigError) and isinstance(e, ValueError)
    assert words in str(e)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("value, kind", [("bitsandbytes", "string"), (["nf4"], "list"), (4, "number")])
def test_quantization_config_that_is_no_object(src, reader, value, kind):
    path = edit_config(src, quantization_config=value)
    e = raises_naming(fastq.ConfigFileError, path, reader)
    assert f"quantization_config is a JSON {kind}" in str(e)


@pytest.mark.parametrize("reader", ["load", "convert"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_foreign_quant_method(src, reader, method):
    path = edit_config(src, quantization_config={"quant_method": method, "bits": 4})
    e = raises_naming(fastq.ConfigFileError, path, reader)
    assert repr(method) in str(e) and "bitsandbytes" in str(e) and "only" in str(e)


def test_inspect_reports_a_foreign_quant_method(src):
    edit_config(src, quantization_config={"quant_method": "gptq", "bits": 4})
    q = inspect_checkpoint(src, estimate=False)["quantization"]
    assert q["quant_method"] == "gptq" and q["method"] is None


def test_invalid_bitsandbytes_quantization_config_names_the_file(src):
    path = edit_config(src, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True, "blocksize": 7})
    e = raises_naming(fastq.ConfigFileError, path, "load")
    assert "blocksize" in str(e)


def test_null_or_empty_quantization_config_is_none(src):
    for value in (None, {}):
        edit_config(src, quantization_config=value)
        assert inspect_checkpoint(src, estimate=False)["quantization"] is None


def test_unreadable_config_json(src, monkeypatch):
    """A PermissionError naming the file (simulated when the tests run as root, whom chmod does not stop)."""
    path = src / "config.json"
    if os.geteuid() == 0:
        read_text = Path.read_text

        def refuse(self, *args, **kwargs):
            if self == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return read_text(self, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", refuse)
    else:
        path.chmod(0)
    for read in READERS.values():
        with pytest.raises(PermissionError) as e:
            read(src)
        assert str(path) in str(e.value)


def test_transformers_refuses_the_config(src):
    path = src / "config.json"
    path.write_text(json.dumps({"model_type": "no-such-model"}))
    raises_naming(fastq.ConfigFileError, path, "convert")


def test_quantization_method_without_torch_agrees_with_quantconfig():
    from fastq.source import quantization_method

    for d in (
        {"load_in_8bit": True},
        {"_load_in_8bit": True, "_load_in_4bit": False},
        {"load_in_4bit": True},
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        {"_load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "quant_method": "bitsandbytes"},
    ):
        assert quantization_method(d) == fastq.QuantConfig.from_dict(d).quantization_method(), d


# -- folders and files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", READERS)
def test_empty_folder(tmp_path, reader):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(fastq.MissingFileError) as e:
        READERS[reader](folder)
    assert str(folder) in str(e.value) and "empty" in str(e.value)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_folder_where_a_file_belongs(src, reader, name):
    path = src / name
    path.unlink()
    path.mkdir()
    with pytest.raises(fastq.FastqIOError) as e:
        READERS[reader](src)
    assert e.value.path == str(path) and str(path) in str(e.value) and e.value.errno == errno.EISDIR


# -- shapes the config cannot give -------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["load", "convert"])
@pytest.mark.parametrize(
    "field, value, tensor",
    [
        ("vocab_size", 2**64, "model.embed_tokens.weight"),  # TypeError at torch.empty
        ("vocab_size", 2**62, "model.embed_tokens.weight"),  # RuntimeError: storage size overflowed
        ("vocab_size", -5, "model.embed_tokens.weight"),
        ("intermediate_size", 2**64, "model.layers.0.mlp.gate_proj.weight"),
    ],
)
def test_shape_that_overflows(src, reader, field, value, tensor):
    if sys.version_info >= (3, 12):  # list comprehensions are inlined: the layer index is gone (skeleton.py)
        tensor = tensor.replace(".0.", ".*.")
    path = edit_config(src, **{field: value})
    e = raises_naming(fastq.ShapeError, path, reader)
    assert e.tensor == tensor and tensor in str(e)
    assert f"{field}={value}" in str(e)


# -- failed writes -----------------------------------------------------------------------------------------


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(name)``: from now on, every write into a file called ``name`` fails with ENOSPC, as on a
    full disk (the file is created, the write fails, and the error names no file)."""
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, *args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def fileno(self):  # shutil.copyfile falls back from sendfile to write()
            raise io.UnsupportedOperation("fileno")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    def start(name: str) -> None:
        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            writes = any(c in mode for c in "wax+")
            if writes and isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)) == name:
                return Full(f)
            return f

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)  # pathlib's write_text

    return start


@pytest.mark.parametrize(
    "name", ["config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json"]
)
def test_convert_full_disk_on_a_side_file(src, tmp_path, full_disk, name):
    (src / "tokenizer.json").write_text("{}")
    dst = tmp_path / "out"
    full_disk(name)
    with pytest.raises(fastq.FastqIOError) as e:
        fastq.convert(src, dst, NF4, progress=False, max_shard_size="300KB")  # 300KB: several shards
    expected = str(temp_folder(dst) / name)
    assert e.value.path == expected and expected in str(e.value), str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert_nothing_left(dst)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_save_full_disk_on_a_side_file(src, tmp_path, full_disk, name):
    model = fastq.load(src, NF4, "cpu", progress=False)
    dst = tmp_path / "saved"
    full_disk(name)
    with pytest.raises(fastq.FastqIOError) as e:
        fastq.save(model, dst)
    expected = str(temp_folder(dst) / name)
    assert e.value.path == expected and expected in str(e.value), str(e.value)
    assert_nothing_left(dst)


def test_save_file_size_limit(src, tmp_path):
    """A shard write that fails (here the file-size limit, as a full disk would) in ``save``: safetensors
    reports it as a SafetensorError; fastq gives a FastqIOError naming the shard."""
    code = (
        "import resource, signal, sys, fastq\n"
        "m = fastq.load(sys.argv[1], fastq.QuantConfig(load_in_4bit=True), 'cpu', progress=False)\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "try:\n"
        "    fastq.save(m, sys.argv[2])\n"
        "except fastq.FastqIOError as e:\n"
        "    print(type(e).__name__, e.path, e.errno)\n"
    )
    dst = tmp_path / "saved"
    r = subprocess.run([sys.executable, "-c", code, src, dst], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["FastqIOError", str(temp_folder(dst) / "model.safetensors"), str(errno.EFBIG)]
    assert_nothing_left(dst)


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: nothing can be created in ``folder`` (EACCES, as for a read-only
    destination; chmod does not stop root, so this is simulated)."""

    def start(folder: Path) -> None:
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)

    return start


def test_convert_into_a_read_only_folder(src, tmp_path, read_only):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(ro)
    with pytest.raises(fastq.FastqIOError) as e:
        fastq.convert(src, ro / "out", INT8, progress=False)
    assert e.value.path == str(ro) and str(ro) in str(e.value) and e.value.errno == errno.EACCES
    assert os.listdir(ro) == []


def test_save_into_a_read_only_folder(src, tmp_path, read_only):
    model = fastq.load(src, INT8, "cpu", progress=False)
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(ro)
    with pytest.raises(fastq.FastqIOError) as e:
        fastq.save(model, ro / "saved")
    assert e.value.path == str(ro) and e.value.errno == errno.EACCES
    assert os.listdir(ro) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="chmod does not stop root")
def test_convert_into_a_really_read_only_folder(src, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises((PermissionError, fastq.FastqIOError)) as e:
            fastq.convert(src, ro / "out", INT8, progress=False)
        assert str(ro) in str(e.value)
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


# -- the destination -------------------------------------------------------------------------------------


def test_overwrite_a_regular_file(src, tmp_path):
    for i, write in enumerate(
        [lambda dst: fastq.convert(src, dst, INT8, progress=False, overwrite=True),
         lambda dst: fastq.save(fastq.load(src, INT8, "cpu", progress=False), dst, overwrite=True)]
    ):
        dst = tmp_path / f"out{i}"
        dst.write_text("not a checkpoint")
        write(dst)
        assert (dst / "config.json").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", *(f"out{j}" for j in range(i + 1))])


def test_dangling_link_is_an_existing_destination(src, tmp_path):
    dst = tmp_path / "out"
    dst.symlink_to(tmp_path / "nowhere")
    with pytest.raises(fastq.OutputExistsError):
        fastq.convert(src, dst, INT8, progress=False)
    assert not temp_folder(dst).exists()
    fastq.convert(src, dst, INT8, progress=False, overwrite=True)
    assert dst.is_dir() and not dst.is_symlink()


def test_failed_rename_keeps_the_old_destination(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("the previous result")
    real_rename = os.rename

    def rename(a, b):
        if Path(a) == temp_folder(dst):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(fastq.FastqIOError) as e:
        fastq.convert(src, dst, INT8, progress=False, overwrite=True)
    assert e.value.path == str(dst)
    assert (dst / "old.txt").read_text() == "the previous result"
    assert not temp_folder(dst).exists() and not (tmp_path / ".out.fastq-old").exists()


def test_overwrite_refuses_a_destination_holding_the_source(src, tmp_path):
    with pytest.raises(fastq.ConfigError, match="holds the source"):
        fastq.convert(src, tmp_path, INT8, progress=False, overwrite=True)
    assert (src / "config.json").is_file()


@pytest.mark.parametrize("threads", [-1, 1.5, True])
def test_convert_refuses_bad_thread_counts(src, tmp_path, threads):
    with pytest.raises(fastq.ConfigError, match="threads"):
        fastq.convert(src, tmp_path / "out", INT8, progress=False, threads=threads)


@pytest.mark.parametrize("size", ["infGB", "nanGB", "-infGB", "0.0000001KB", "1e400GB", "GB", True])
def test_parse_size_refuses_non_sizes(size):
    from fastq.convert import parse_size

    with pytest.raises(fastq.ConfigError):
        parse_size(size)


@pytest.mark.parametrize("dtype", ["float7", "int8", "torch.int64", 5])
def test_dtype_that_is_no_float_dtype(src, tmp_path, dtype):
    with pytest.raises(fastq.ConfigError) as e:
        fastq.convert(src, tmp_path / "out", INT8, progress=False, dtype=dtype)
    assert repr(dtype) in str(e.value) and "None" not in str(e.value)
