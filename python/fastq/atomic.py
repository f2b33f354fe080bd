"""Folders that appear whole or not at all, shared by ``fastq.convert`` and ``fastq.save``.

A result is written into a temporary sibling of its destination (``temp_folder``), synced, and renamed
into place (``commit``): the rename is the only moment the destination appears, so a crash or a kill
never leaves a folder that looks finished. A conversion also holds ``FolderLock`` on its temporary
folder, so two runs never write into it at once. A write the operating system refuses (a full disk, a
read-only folder) is a ``FastqIOError`` naming the file (``writing``).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import ConversionLockedError, FastqError, FastqIOError, OutputExistsError

__all__ = [
    "LOCK_NAME",
    "FolderLock",
    "clear",
    "commit",
    "fsync_path",
    "io_error",
    "lock_temp_folder",
    "remove",
    "remove_unless_locked",
    "temp_folder",
    "writing",
]

#: The lock file inside a temporary folder.
LOCK_NAME = ".lock"


def temp_folder(dst: str | os.PathLike) -> Path:
    """The temporary sibling folder a conversion or save to ``dst`` writes into."""
    dst = Path(dst).absolute()
    return dst.parent / f".{dst.name}.fastq-tmp"


def io_error(path: str | os.PathLike, e: OSError, doing: str = "cannot write it") -> FastqIOError:
    """A ``FastqIOError`` naming ``path``, with the errno of the ``OSError`` it stands for."""
    err = FastqIOError(f"{os.fspath(path)}: {doing}: {e.strerror or e}", path=path)
    err.errno = e.errno  # (no strerror or filename: OSError's str() would replace the message)
    return err


@contextlib.contextmanager
def writing(path: str | os.PathLike, doing: str = "cannot write it") -> Iterator[None]:
    """Turns a failed write inside into a ``FastqIOError`` naming the file: the error's own file name, else
    (``path`` a folder that another library writes into) the file under it that the failing code was
    writing, else ``path``. A write that fails for a full disk names no file; safetensors reports one as a
    ``SafetensorError`` ("... (os error 28)"), which is turned too. fastq's own errors pass as they are."""
    try:
        yield
    except FastqError:
        raise
    except Exception as e:
        os_error = _as_os_error(e)
        if os_error is None:
            raise
        name = getattr(e, "filename", None) or _file_being_written(e, Path(path)) or path
        raise io_error(name, os_error, doing) from e


def _as_os_error(e: BaseException) -> OSError | None:
    if isinstance(e, OSError):
        return e
    match = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    return OSError(int(match[1]), os.strerror(int(match[1]))) if match else None


def _file_being_written(e: BaseException, folder: Path) -> str | None:
    """The file directly under ``folder`` that the innermost frame of ``e`` holds, as an open file
    object or as a path (a library's ``open(path, "w")`` or ``save_file(tensors, path)``)."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            name = getattr(value, "name", None) if isinstance(value, io.IOBase) else value
            if isinstance(name, (str, os.PathLike)) and Path(name).parent == folder:
                return os.fspath(name)
    return None


def remove(path: Path, ignore_errors: bool = False) -> None:
    """Removes a file, a link or a folder tree, whichever ``path`` is; nothing if it is gone.
    ``ignore_errors``: remove what can be removed and raise nothing."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors)
        return
    try:
        path.unlink(missing_ok=True)
    except OSError:
        if not ignore_errors:
            raise


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


def lock_temp_folder(dst: Path) -> FolderLock:
    """Creates (or reuses) ``temp_folder(dst)`` and locks it.

    Raises:
        ConversionLockedError: another conversion holds it.
        FastqIOError: the folder cannot be created there (a read-only destination); nothing is left.
    """
    tmp = temp_folder(dst)
    created = not os.path.lexists(tmp)
    try:
        return FolderLock(tmp)
    except FastqError:
        raise
    except OSError as e:
        if created and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        raise io_error(tmp.parent, e, f"cannot create {tmp.name} here for {dst.name}") from e


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
        FastqIOError: a sync or a rename failed; an existing ``dst`` is left in place.
    """
    if fsync:
        for p in tmp.iterdir():
            if p.is_file() and not p.name.endswith(".safetensors"):  # shards were synced by the writer
                with writing(p, "cannot sync it"):
                    fsync_path(p)
        with writing(tmp, "cannot sync it"):
            fsync_path(tmp, directory=True)
    trash = None
    if os.path.lexists(dst):  # a folder, a file or a link (even a dangling one)
        if not overwrite:
            raise OutputExistsError(f"{dst} appeared while converting; the result is kept in {tmp}")
        trash = dst.parent / f".{dst.name}.fastq-old"
        with writing(trash, "cannot move the old destination aside"):
            remove(trash)
            os.rename(dst, trash)
    try:
        with writing(dst, "cannot rename the result into place"):
            os.rename(tmp, dst)
    except BaseException:
        if trash is not None:
            os.rename(trash, dst)  # the old destination back where it was
        raise
    if fsync:
        with writing(dst.parent, "cannot sync it"):
            fsync_path(dst.parent, directory=True)
    if trash is not None:
        remove(trash, ignore_errors=True)  # the new folder is in place; the old one is only garbage
