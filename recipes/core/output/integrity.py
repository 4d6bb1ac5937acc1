"""Whether a checkpoint's files are still the ones that were written.

A checkpoint marked complete can be damaged later: a disk that fills, a node that dies while copying it, a
copy between clusters that stopped half-way. At save, the completion marker records each file's size and
SHA-256 (`file_records`); before a resume loads or changes anything, `find_damage` checks that every
recorded file is there with its size, that each file parses as its format says, and that the checksums
match. Checkpoints written before the marker held records get the format checks only.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

_CHUNK = 1 << 20
# Files torch.save writes (Accelerate's optimizer.bin and RNG states, DeepSpeed's *.pt, ours): zip archives.
_TORCH_SUFFIXES = {".pt", ".bin", ".pth", ".pkl"}
STATE_KEYS = ("step", "epoch", "batches_in_epoch", "num_processes")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)  # releases the GIL: files hash in parallel threads
    return digest.hexdigest()


def file_records(directory: Path, exclude: str) -> dict[str, dict]:
    """{path relative to `directory`: {"size", "sha256"}} for every file under it but `exclude`."""
    paths = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != exclude)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(sha256, paths))
    return {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": digest}
        for p, digest in zip(paths, digests, strict=True)
    }


def find_damage(directory: Path, marker: str, state_file: str) -> str | None:
    """What is wrong with checkpoint `directory`, naming the file, or None when it is intact."""
    try:
        recorded = json.loads((directory / marker).read_text()).get("files")
    except (OSError, ValueError, AttributeError) as err:
        return f"{marker}: {_reason(err)}"
    for name in (state_file, "config.yaml"):
        if not (directory / name).is_file():
            return f"{name} is missing"
    if recorded is not None:
        for name, record in recorded.items():
            path = directory / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != record["size"]:
                return f"{name} has {path.stat().st_size:,} bytes where {record['size']:,} were written"
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != marker)
    for path in files:
        problem = format_problem(path)
        if problem:
            return f"{path.relative_to(directory).as_posix()} {problem}"
    state = json.loads((directory / state_file).read_text())
    missing = [key for key in STATE_KEYS if key not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        return f"{state_file} lacks {', '.join(missing)}"
    if recorded is not None:
        names = sorted(recorded)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(lambda name: sha256(directory / name), names))
        for name, digest in zip(names, digests, strict=True):
            if digest != recorded[name]["sha256"]:
                return f"{name} has other contents than were written (its SHA-256 differs)"
    return None


def format_problem(path: Path) -> str | None:
    """Why `path` does not parse as its suffix says (JSON, YAML, safetensors, a torch.save zip archive)."""
    try:
        if path.stat().st_size == 0:
            return "is empty"
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            yaml.safe_load(path.read_text())
        elif path.suffix == ".safetensors":
            _check_safetensors(path)
        elif path.suffix in _TORCH_SUFFIXES and _starts_like_zip(path):
            with zipfile.ZipFile(path):  # reads the central directory at the end: a cut file has none
                pass
    except (OSError, ValueError, yaml.YAMLError, zipfile.BadZipFile) as err:
        return f"does not parse ({_reason(err)})"
    return None


def _check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header and the tensors' bytes, which must
    end exactly where the file does."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if 8 + header_size > size:
            raise ValueError(f"its header claims {header_size:,} bytes and the file has {size:,}")
        header = json.loads(f.read(header_size))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_size + end != size:
        raise ValueError(f"its tensors end at byte {8 + header_size + end:,} and the file has {size:,}")


def _starts_like_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _reason(err: Exception) -> str:
    text = getattr(err, "strerror", None) or next(iter(str(err).strip().splitlines()), "")
    return (text or type(err).__name__)[:200]
