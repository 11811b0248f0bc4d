"""Getting files onto disk safely: finding dataset files, mirrors, resumable downloads, SHA-256.

A final file name only ever holds complete, verified bytes: downloads stream into
``<dest>.part`` next to the destination and are renamed with ``os.replace`` after the
checksum matches (fileio.atomic_write does the same for bytes made in memory).
A ``.part`` left by a dropped connection is resumed with an HTTP Range request next time.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from ddpmkit import __version__
from ddpmkit.errors import DdpmkitError

CHUNK_SIZE = 1 << 20
USER_AGENT = f"ddpmkit/{__version__} (python urllib)"
DATA_DIR_ENV = "DDPMKIT_DATA_DIR"


class _MirrorFailed(Exception):
    """One mirror could not deliver the file; the message is the reason shown to the user."""


def cache_dir() -> Path:
    """Where downloads are kept: ``$XDG_CACHE_HOME/ddpmkit``, else ``~/.cache/ddpmkit``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores relative paths
    return root / "ddpmkit"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks so large archives need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def find_dataset_files(
    name: str,
    required: Sequence[Sequence[str]],
    data_dir: str | os.PathLike | None,
    *,
    debian_root: Path,
    mirrors: Sequence[str] | None,
    sha256: dict[str, str],
    progress: bool = True,
) -> list[Path]:
    """Find a dataset's files, or download them into ``cache_dir()/<name>``.

    ``required`` lists, per file, the names it may have locally, the downloadable one first.
    A directory qualifies when it holds all of them. With ``data_dir`` only ``data_dir`` and
    ``data_dir/<name>`` are searched (an explicit choice is never silently replaced);
    otherwise ``$DDPMKIT_DATA_DIR`` (and its ``<name>``), ``debian_root/<name>`` and the cache,
    in that order, then the ``mirrors`` (base URLs; None forbids downloading).
    """
    wanted = " and ".join(" or ".join(names) for names in required)
    if data_dir is not None:
        roots = [Path(data_dir), Path(data_dir) / name]
        if found := next(filter(None, (_find_in(root, required) for root in roots)), None):
            return found
        raise DdpmkitError(
            f"{name} files not found in data_dir: looked in {' and '.join(map(str, roots))} for "
            f"{wanted}; put them there, or leave data_dir unset to use the cache or a download."
        )
    env = os.environ.get(DATA_DIR_ENV)
    roots = ([Path(env), Path(env) / name] if env else []) + [Path(debian_root) / name, cache_dir() / name]
    if found := next(filter(None, (_find_in(root, required) for root in roots)), None):
        return found
    if mirrors is None:
        raise DdpmkitError(
            f"{name} files not found (looked in {', '.join(map(str, roots))} for {wanted}); "
            "allow downloading or put the files in one of those directories."
        )
    return [
        download(
            [base + names[0] for base in mirrors], cache_dir() / name / names[0], sha256[names[0]], progress=progress
        )
        for names in required
    ]


def _find_in(root: Path, required: Sequence[Sequence[str]]) -> list[Path] | None:
    """The paths of all required files in ``root`` (first existing alternative each), or None."""
    found = [next((root / n for n in names if (root / n).exists()), None) for names in required]
    return None if None in found else found


def download(
    urls: Sequence[str],
    dest: str | os.PathLike,
    sha256: str,
    *,
    timeout: float = 30,
    progress: bool = True,
) -> Path:
    """Fetch ``dest`` from the first mirror in ``urls`` that delivers bytes with this SHA-256.

    Returns ``dest`` at once when it (or a finished ``.part``) holds the right bytes. Each mirror is tried
    in order; a checksum mismatch deletes the temporary file, a dropped connection keeps it
    so the next mirror (or the next run) can resume it. Raises DdpmkitError listing every
    mirror and why it failed when none succeeds.
    """
    dest, expected = Path(dest), sha256.lower()
    if dest.is_file() and sha256_file(dest) == expected:
        return dest
    part = dest.with_suffix(dest.suffix + ".part")
    reasons = []
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if part.is_file() and sha256_file(part) == expected:  # finished earlier but never renamed
            os.replace(part, dest)
            return dest
        for url in urls:
            try:
                _fetch_verified(url, part, expected, timeout, progress)
            except _MirrorFailed as failure:
                reasons.append(f"{url} ({failure})")
                continue
            os.replace(part, dest)
            return dest
    except OSError as error:  # network errors are _MirrorFailed by now, so this is the local disk
        raise DdpmkitError(
            f"Could not write {part}: {error}; check that the directory is writable and has space."
        ) from error
    tried = "; ".join(reasons) if reasons else "no mirrors were given"
    raise DdpmkitError(
        f"Could not download {dest.name}: {tried}. Check your internet connection, "
        f"or fetch the file yourself and put it at {dest}."
    )


def _fetch_verified(url: str, part: Path, expected: str, timeout: float, progress: bool) -> None:
    """Download ``url`` into ``part`` and check its SHA-256, retrying from scratch once after a bad resume."""
    resumed = _fetch(url, part, timeout, progress)
    got = sha256_file(part)
    if got != expected and resumed:  # the kept prefix may have come from another copy: start over
        part.unlink()
        _fetch(url, part, timeout, progress)
        got = sha256_file(part)
    if got != expected:
        part.unlink()
        raise _MirrorFailed(f"checksum mismatch: expected SHA-256 {expected}, got {got}")


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> bool:
    """Stream ``url`` into ``part``, appending when the server honours a Range request.

    Returns True when the bytes were appended to an existing partial file.
    """
    if urlparse(url).scheme not in ("http", "https"):
        raise _MirrorFailed("only http and https URLs are supported")
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # our partial file is longer than the server's: start again
            part.unlink()
            return _fetch(url, part, timeout, progress)
        raise _MirrorFailed(f"HTTP {error.code} {error.reason}") from error
    except (OSError, http.client.HTTPException) as error:  # URLError, refused, timed out, bad status line
        raise _MirrorFailed(str(getattr(error, "reason", error)) or type(error).__name__) from error
    with response:
        offset = _start_offset(response, offset)
        _copy(response, part, offset, _total_size(response, offset), progress)
    return offset > 0


def _start_offset(response, offset: int) -> int:
    """Where the body starts in the file: ``offset`` for a 206 reply, 0 when the server ignored Range."""
    if response.status != 206:
        return 0
    content_range = response.headers.get("Content-Range", "")
    if not content_range.startswith(f"bytes {offset}-"):
        raise _MirrorFailed(f"server answered a resume request with a bad Content-Range {content_range!r}")
    return offset


def _total_size(response, offset: int) -> int | None:
    """The full file size the server announced (Content-Range total or Content-Length), if any."""
    try:
        if response.status == 206:
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            return int(total) if total != "*" else None
        length = response.headers.get("Content-Length")
        return int(length) + offset if length is not None else None
    except ValueError:
        return None


def _copy(response, part: Path, offset: int, total: int | None, progress: bool) -> None:
    """Append the response body to ``part`` (truncating it first when ``offset`` is 0) with a progress bar."""
    received = offset
    name = part.name.removesuffix(".part")
    with (
        open(part, "ab" if offset else "wb") as out,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=name,
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while True:
            try:
                block = response.read(CHUNK_SIZE)
            except (OSError, http.client.HTTPException) as error:
                raise _MirrorFailed(f"connection lost after {received} bytes ({error})") from error
            if not block:
                break
            out.write(block)
            received += len(block)
            bar.update(len(block))
    if total is not None and received != total:
        raise _MirrorFailed(f"truncated: got {received} of {total} bytes")
