"""Failed writes give typed errors that name the file, never a bare traceback, and leave nothing behind.

The write failures are simulated: a file whose writes fail with ENOSPC (what a full disk gives), a folder
where nothing can be created (what a read-only destination gives), a per-process file-size limit.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fastq
import pytest
from fastq.atomic import temp_folder

INT8 = fastq.QuantConfig(load_in_8bit=True)
NF4 = fastq.QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")


@pytest.fixture
def src(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny Llama checkpoint, to break."""
    folder = tmp_path / "src"
    shutil.copytree(tiny_model("llama"), folder)
    return folder


def assert_nothing_left(dst: Path) -> None:
    assert not os.path.lexists(dst), f"{dst} was written"
    assert not temp_folder(dst).exists(), "the temporary folder was left behind"
    assert not (dst.parent / f".{dst.name}.fastq-old").exists()


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
