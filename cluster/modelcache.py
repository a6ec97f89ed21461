"""Tiny generated checkpoints (`model.make` in a cluster config), written once into a cache dir.

The directory name holds a hash of the make arguments (`modelgen.spec.MakeSpec`), so a config
always finds the same model and different arguments never share one. Writers take a file lock
and write into a temporary directory that is renamed into place, so two processes starting at
once generate it once, and a crash mid-write never leaves a half checkpoint under the final name.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from modelgen.spec import MakeSpec

CACHE_ENV = "PDSERVE_CACHE"

# NOTE: fields added after the cache existed enter the directory hash only when they differ from
# their defaults, so configs written before them keep finding their checkpoints.
UNHASHED_DEFAULTS: dict[str, Any] = {"fp8": False, "tokenizer": None}


def cache_root() -> Path:
    """$PDSERVE_CACHE, else ~/.cache/pdserve/models."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pdserve" / "models"


def model_dir(make: MakeSpec, root: Path | None = None) -> Path:
    """Where the checkpoint of `make` lives (whether or not it was written yet)."""
    fields = dataclasses.asdict(make)
    for name, default in UNHASHED_DEFAULTS.items():
        if fields[name] == default:
            del fields[name]
    args = json.dumps(fields, sort_keys=True)
    digest = hashlib.sha256(args.encode()).hexdigest()[:16]
    return (root or cache_root()) / f"{make.arch}-{digest}"


def ensure_model(make: MakeSpec, root: Path | None = None) -> Path:
    """The checkpoint of `make`, generated first when it is not in the cache yet."""
    target = model_dir(make, root)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not is_complete(target):
            write_atomically(make, target)
    return target


def is_complete(path: Path) -> bool:
    if path.exists() and not (path / "config.json").is_file():
        raise FileExistsError(f"{path} exists but holds no checkpoint (remove it to regenerate)")
    return path.is_dir()


def write_atomically(make: MakeSpec, target: Path) -> None:
    from modelgen.make import make_model  # torch and transformers: only when writing a model

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            make_model(make.arch, tmp, **make.make_kwargs())
        except ValueError as exc:
            raise ValueError(f"model.make: {exc}") from None
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users' containers
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
