"""The fetch cache: directories that are either complete and verified, or absent.

[Note: the fetch cache]
Each cached thing (a converted model, a pinned download) is one directory holding its files and a MANIFEST.json
that lists each file's size in bytes and sha256, plus the metadata it was built for (format version, source pins).
- Atomic: a directory is built as <parent>/.<name>.tmp-<random> beside its target and renamed into place with
  os.replace, MANIFEST.json written last, so a fetch killed at any moment leaves either the old state or the new one,
  never a half-written model under the real name. Leftover .tmp/.old directories are removed by the next fetch.
- Verified on every use: sizes first (cheap, catches truncation), then sha256 of every file. Hashing the 538 MB of
  the fp32 SmolLM2 model takes about 0.8 s on the 2-core dev machine, so there is no "verified once" stamp to trust
  instead. A damaged or foreign directory (missing manifest, other metadata, a size or hash mismatch) is rebuilt,
  and the log says why.
- Serialised: a file lock <parent>/.<name>.lock is held while checking and building, so the ranks of a job that
  all call fetch() at once build the model once and the others wait for it and reuse it. The lock file is never
  deleted (deleting lock files races with a process that has just opened it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tessera.errors import InternalError

MANIFEST = "MANIFEST.json"


class Log:
    """Progress lines on stderr ("tessera fetch: ..."), or nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"tessera fetch: {message}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (streamed in 4 MiB reads; about 0.7 GB/s on the dev machine)."""
    h = hashlib.sha256()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def write_manifest(directory: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Writes directory/MANIFEST.json listing every regular file in `directory` (size in bytes, sha256) and `meta`;
    returns the manifest."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.name != MANIFEST and path.is_file():
            files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"meta": dict(meta), "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def verify(directory: Path, meta: Mapping[str, Any], pinned: Mapping[str, str] | None = None) -> str | None:
    """None when `directory` holds a manifest for `meta` and every listed file has its size and sha256 (and the
    sha256 in `pinned`, file name -> hex, for the files named there); else why not, naming the file and the
    expected and found values."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing (an interrupted or foreign directory)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        found_meta = manifest["meta"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest_path} is unreadable ({type(e).__name__}: {e})"
    if found_meta != dict(meta):
        return f"{manifest_path} was built for {found_meta}, expected {dict(meta)}"
    for name, sha in (pinned or {}).items():
        if files.get(name, {}).get("sha256") != sha:
            return f"{directory / name}: manifest lists sha256 {files.get(name, {}).get('sha256')}, pinned {sha}"
    for name, entry in files.items():  # sizes first: a truncated file is found without hashing the rest
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path} has {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
    for name, entry in files.items():
        digest = sha256_file(directory / name)
        if digest != entry["sha256"]:
            return f"{directory / name}: sha256 {digest}, the manifest says {entry['sha256']} (corrupted)"
    return None


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive flock on `lock_path` (created if absent, never deleted: deleting lock files races with a
    process that has just opened one), so concurrent processes (a job's ranks) build a cached file once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Removes .<name>.tmp-* / .<name>.old-* beside target: every builder holds the lock, so under the lock any such
    directory belongs to a fetch that was killed."""
    for prefix in (f".{target.name}.tmp-", f".{target.name}.old-"):
        for path in target.parent.glob(prefix + "*"):
            shutil.rmtree(path, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> None:
    """Renames the finished tmp directory to target, moving a damaged target aside first (a directory cannot be
    replaced by rename while it has files)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "d")
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def ensure(target: Path, meta: Mapping[str, Any], build: Callable[[Path], None], log: Callable[[str], None], *,
           what: str, pinned: Mapping[str, str] | None = None) -> Path:
    """Returns `target` once it is a verified cache directory for `meta`, building it first with build(tmp_dir)
    when it is absent or damaged (see [Note: the fetch cache]). `what` names it in the log. Errors from build
    propagate; the temporary directory is removed and target is left as it was."""
    with locked(target.parent / f".{target.name}.lock"):
        _remove_leftovers(target)
        if target.exists():
            start = time.monotonic()
            problem = verify(target, meta, pinned)
            if problem is None:
                log(f"{what}: cached at {target} (verified sha256 in {time.monotonic() - start:.1f} s)")
                return target
            log(f"{what}: the cached copy is damaged, rebuilding it: {problem}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            start = time.monotonic()
            manifest = write_manifest(tmp, meta)
            for name, sha in (pinned or {}).items():
                found = manifest["files"].get(name, {}).get("sha256")
                if found != sha:  # the builder checks its pins itself; this guards against a builder bug
                    raise InternalError(f"{what}: built {tmp / name} with sha256 {found}, pinned {sha}")
            n, total = len(manifest["files"]), sum(e["size"] for e in manifest["files"].values())
            log(f"{what}: {n} file{'s' if n != 1 else ''}, {mb(total)}, sha256 manifest written in "
                f"{time.monotonic() - start:.1f} s")
            _publish(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"{what}: ready at {target}")
    return target
