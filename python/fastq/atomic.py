"""Folders that appear whole or not at all, shared by ``fastq.convert`` and ``fastq.save``.

A result is written into a temporary sibling of its destination (``temp_folder``), synced, and renamed
into place (``commit``): the rename is the only moment the destination appears, so a crash or a kill
never leaves a folder that looks finished. A conversion also holds ``FolderLock`` on its temporary
folder, so two runs never write into it at once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from .errors import ConversionLockedError, OutputExistsError

__all__ = ["LOCK_NAME", "FolderLock", "clear", "commit", "fsync_path", "remove_unless_locked", "temp_folder"]

#: The lock file inside a temporary folder.
LOCK_NAME = ".lock"


def temp_folder(dst: str | os.PathLike) -> Path:
    """The temporary sibling folder a conversion or save to ``dst`` writes into."""
    dst = Path(dst).absolute()
    return dst.parent / f".{dst.name}.fastq-tmp"


def fsync_path(path: Path, directory: bool = False) -> None:
    """Syncs a file (or, with ``directory``, a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderLock:
    """An exclusive lock on the temporary folder, so two conversions never write into it at once.

    Raises:
        ConversionLockedError: another process holds it.
    """

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOCK_NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ConversionLockedError(f"{folder}: another conversion is writing here") from None

    def release(self, remove: bool = False) -> None:
        """Unlocks (once); ``remove`` deletes the lock file first."""
        if self.fd is not None:
            if remove:
                self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def clear(folder: Path) -> None:
    """Removes everything in ``folder`` but its lock file."""
    for p in folder.iterdir():
        if p.name != LOCK_NAME:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def remove_unless_locked(folder: Path) -> None:
    """Removes ``folder``, unless another process holds its lock."""
    try:
        with open(folder / LOCK_NAME, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(folder, ignore_errors=True)
    except OSError:
        pass


def commit(tmp: Path, dst: Path, overwrite: bool, fsync: bool) -> None:
    """Renames the finished temporary folder into place (the only moment DST appears).

    Args:
        tmp: the finished folder (``temp_folder(dst)``).
        dst: the destination; an existing one is replaced only with ``overwrite``.
        overwrite: replace ``dst`` if it exists (it is moved aside, then removed after the rename).
        fsync: sync every file but the shards (the writer synced those) and the folders around the rename.

    Raises:
        OutputExistsError: ``dst`` appeared meanwhile and ``overwrite`` is False.
    """
    if fsync:
        for p in tmp.iterdir():
            if p.is_file() and not p.name.endswith(".safetensors"):  # shards were synced by the writer
                fsync_path(p)
        fsync_path(tmp, directory=True)
    trash = None
    if dst.exists():
        if not overwrite:
            raise OutputExistsError(f"{dst} appeared while converting; the result is kept in {tmp}")
        trash = dst.parent / f".{dst.name}.fastq-old"
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(dst, trash)
    os.rename(tmp, dst)
    if fsync:
        fsync_path(dst.parent, directory=True)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
