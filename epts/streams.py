"""Where the calibration streams live: in RAM, or past a RAM budget in memory-mapped scratch files.

A compress run holds two streams of hidden states (dense and elastic, n_windows x seqlen x hidden
each, on the CPU) and makes a few more of that size per block (targets, mixed features). Past the
budget (`EPTSConfig.stream_memory_mb`, `epts compress --stream-memory`) each of them is a file in a
scratch folder, mapped into memory (`torch.from_file`): its pages are the page cache's, which the
OS writes back to disk and evicts under memory pressure, where ordinary tensors would need swap.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import weakref
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class ScratchSpaceError(OSError):
    """The scratch folder's disk cannot hold a stream."""


# Scratch folders are named for their host and process, so a later run can tell the leftovers of a
# process that died without cleaning up (SIGKILL, a node lost) from those of one still running.
_SCRATCH = re.compile(r"^epts-(?:streams|block)-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")


def scratch_prefix(kind: str) -> str:
    """The name prefix of this process's scratch folders of `kind` (streams, block): `epts-KIND-HOST-PID-`."""
    return f"epts-{kind}-{socket.gethostname()}-{os.getpid()}-"


def sweep_scratch(folder: str | os.PathLike | None = None) -> list[Path]:
    """Remove the scratch folders under `folder` (default: TMPDIR) left by dead processes of this
    host; returns them. Those of live processes, and of other hosts sharing the folder, stay."""
    removed = []
    root = Path(folder or tempfile.gettempdir())
    for path in root.glob("epts-*-*"):
        found = _SCRATCH.match(path.name)
        if not found or found["host"] != socket.gethostname() or _alive(int(found["pid"])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, the scratch folder of a process that no longer runs", path)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class StreamStore:
    """Allocates the stream tensors of one run. `budget_mb` None: no limit, every stream an ordinary
    tensor. Otherwise, when two streams (dense and elastic) of the size asked for exceed `budget_mb`
    MiB, each stream is a file in a scratch folder under `folder` (default: TMPDIR), deleted when
    the tensor is freed; the folder goes when the store closes (`with` block), also on error."""

    def __init__(self, budget_mb: float | None = None, folder: str | os.PathLike | None = None):
        self.budget_mb = budget_mb
        self.folder = folder
        self.scratch: Path | None = None  # the scratch folder, once a stream has spilled
        self._count = 0

    def __enter__(self) -> "StreamStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the scratch folder. Streams still alive stay readable: their mappings outlive the files."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None

    def spills(self, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether a stream of `shape` and `dtype` goes to a file: two of them exceed the budget."""
        nbytes = 2 * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        return self.budget_mb is not None and nbytes > self.budget_mb * 2**20

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU stream: in RAM, or mapped from a new scratch file past the budget."""
        if not self.spills(shape, dtype):
            return torch.empty(shape, dtype=dtype)
        if self.scratch is None:
            self.scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix("streams"), dir=self.folder))
            log.info("streams past %g MiB: memory-mapped from %s", self.budget_mb, self.scratch)
        self._count += 1
        path = self.scratch / f"stream-{self._count}.bin"
        numel = torch.Size(shape).numel()
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        # Reserve the blocks now: a mapped file that outgrows its disk kills the process (SIGBUS) with no message.
        with path.open("wb") as f:
            if nbytes and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(f.fileno(), 0, nbytes)
                except OSError as err:
                    path.unlink()
                    raise ScratchSpaceError(
                        f"no room for a {nbytes / 2**20:.0f} MiB calibration stream in {self.scratch} "
                        f"({err.strerror}): free space there, set TMPDIR to a larger disk, or raise "
                        f"--stream-memory") from None
        tensor = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        # The file goes with the tensor: its disk space is reclaimed as the run moves on.
        weakref.finalize(tensor, _unlink, path)
        return tensor

    def empty_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """A stream of `tensor`'s shape and dtype (on a device other than the CPU: there, as torch.empty_like)."""
        if tensor.device.type != "cpu":
            return torch.empty_like(tensor)
        return self.empty(tuple(tensor.shape), tensor.dtype)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` where this store keeps a stream of its size: itself when that is RAM, else a mapped copy."""
        if tensor.device.type != "cpu" or not self.spills(tuple(tensor.shape), tensor.dtype):
            return tensor
        return self.clone(tensor)

    def clone(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of `tensor` as a stream of this store."""
        return self.empty_like(tensor).copy_(tensor)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
