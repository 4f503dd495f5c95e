"""Atomic file writes: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


def unprivate(path: str | os.PathLike, mode: int) -> None:
    """Give a mkstemp/mkdtemp result (created 0600/0700) the `mode` an ordinary file or folder gets under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def unprivate_tree(folder: str | os.PathLike) -> None:
    """`unprivate` a written folder and everything in it: safetensors (and so save_pretrained)
    creates weight files owner-only (0600), which a shared cluster or a serving account cannot read."""
    folder = Path(folder)
    unprivate(folder, 0o777)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            unprivate(path, 0o777 if path.is_dir() else 0o666)


def refuse_inputs(target: str | os.PathLike, flag: str, inputs: dict[str, object]) -> None:
    """Raise ValueError when writing `target` would delete or overwrite an input: `target` is an
    input, a folder holding one, or an existing file inside an input folder. Paths are compared
    resolved (links followed); inputs that are not local paths (hub ids, dataset names, tensors)
    are skipped."""
    resolved = Path(target).resolve()
    for name, spec in inputs.items():
        if not isinstance(spec, (str, os.PathLike)) or not Path(spec).exists():
            continue
        source = Path(spec).resolve()
        if resolved == source or resolved in source.parents:
            raise ValueError(f"{flag} {target} would replace the input {name} {spec}: choose another {flag}")
        if source in resolved.parents and resolved.is_file():
            raise ValueError(f"{flag} {target} is a file inside the input {name} {spec}: choose another {flag}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    unprivate(tmp, 0o666)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                        metadata: dict[str, str] | None = None) -> Path:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        unprivate(tmp, 0o666)  # save_file recreates the file owner-only
    return Path(path)


def publish_folder(tmp: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Rename the finished folder `tmp` onto `out` (same file system). Only `overwrite` removes
    anything: the old `out` is first renamed aside, which one process alone can do, then removed.
    Raises FileExistsError, removing nothing, when `out` exists without `overwrite` or appeared
    meanwhile (another run writing the same folder)."""
    tmp, out = Path(tmp), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} appeared while this run was writing it (another run with the same output?): "
                              f"nothing was replaced; choose another output folder or pass --overwrite")
    aside = None
    try:
        if overwrite and (out.exists() or out.is_symlink()):
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / out.name
            try:
                os.rename(out, aside)
            except FileNotFoundError:  # another process took it first
                pass
        os.rename(tmp, out)
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
        raise FileExistsError(f"{out} appeared while this run was writing it (another run with the same output?): "
                              f"nothing was replaced; choose another output folder") from None
    finally:
        if aside is not None:
            shutil.rmtree(aside.parent, ignore_errors=True)
    return out


LOCK = ".epts-lock"


@contextmanager
def folder_lock(folder: str | os.PathLike, flag: str) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if missing) for the block: `flock` on its file
    LOCK, which the OS releases when the process ends, however it ends. Raises FileExistsError,
    naming `flag` (the option that chose the folder), when another process holds it. A folder
    this call created and nothing was written into is removed again (a run that failed early
    leaves no trace)."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{folder} is being written by another epts run: wait for it to end, or choose "
                                  f"another {flag}") from None
        yield folder
    finally:
        if created and [p.name for p in folder.iterdir()] == [LOCK]:
            (folder / LOCK).unlink(missing_ok=True)
            folder.rmdir()
        os.close(fd)


def empty_folder(folder: str | os.PathLike, keep: str) -> None:
    """Remove everything in `folder` but the entry named `keep` (a lock held on it stays valid)."""
    for path in Path(folder).iterdir():
        if path.name == keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
