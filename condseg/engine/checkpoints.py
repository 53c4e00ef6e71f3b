"""Checkpoint files: atomic writes, contents that load with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (no pickled classes or
functions), so loading one cannot run code. It is written to a temporary file in the same folder,
flushed to disk, then renamed over the old one: a process killed mid-write leaves the previous
checkpoint intact.
"""
import os
import re
import tempfile
from pathlib import Path

import torch

# The process's umask, read once at import (reading it means setting it: not while threads write files).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

FORMAT = "condseg-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A file is missing, unreadable or not a condseg checkpoint."""


def save_checkpoint(state, path):
    """Write ``state`` to ``path`` atomically (temporary file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _ignore_missing():
            os.unlink(tmp)
        raise
    return path


class _ignore_missing:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, FileNotFoundError)


def load_checkpoint(path, map_location="cpu", mmap=False):
    """Read a checkpoint with ``weights_only=True``; errors name the file and say what is wrong.
    ``mmap=True`` maps the file instead of reading it: for the plain values of a checkpoint whose
    tensors (hundreds of MB) are not needed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # not a torch file, truncated file, foreign pickle, ...
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:  # unreadable: the error below says what torch.load met
            head = b"PK"
        if not head.startswith((b"PK", b"\x80")):  # neither torch.save's zip nor a pickle: say so plainly
            raise CheckpointError(f"cannot load checkpoint {path}: not a file written by torch.save, so not a "
                                  f"condseg checkpoint (those are the .pt files that training writes)") from None
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch marks words bold with terminal codes
        first_line = (plain.strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot load checkpoint {path}: not a condseg checkpoint, or a damaged one "
                              f"({type(e).__name__}: {first_line})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a condseg checkpoint (no '{FORMAT}' marker); "
                              f"plain state_dicts load with model.load_state_dict(torch.load(...))")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer condseg (format {state['version']} > {VERSION})")
    return state
