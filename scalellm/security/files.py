"""Reading files that hold secrets (API keys, the mesh token, TLS private keys) carefully.

A secret file is refused when users other than its owner and group may read it, or anyone but
its owner may write it (mode bits ``0o026``: ``o+r``, ``o+w``, ``g+w``), the rule ssh applies to
private keys, loosened for the group so that a container user or a Kubernetes ``fsGroup`` can be
given read access (``chmod 640``). Refusing, rather than warning, means a service never starts
with a secret that others on the host could have read or swapped.
"""

from __future__ import annotations

import stat
from pathlib import Path

UNSAFE_BITS = stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP


class SecretFileError(ValueError):
    """A secret file is missing, empty, or open to other users."""


def check_private(path: str | Path, what: str) -> Path:
    """``path`` if it is a regular file only its owner (and group, read-only) can reach."""
    file = Path(path)
    try:
        mode = file.stat().st_mode
    except OSError as exc:
        raise SecretFileError(f"{what} {file}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(mode):
        raise SecretFileError(f"{what} {file} is not a regular file")
    if mode & UNSAFE_BITS:
        raise SecretFileError(
            f"{what} {file} has mode {stat.S_IMODE(mode):04o}: other users may read or change it; "
            f"run `chmod 600 {file}` (or 640 to share it with the service's group)"
        )
    return file


def read_secret(path: str | Path, what: str) -> str:
    """The file's text without surrounding whitespace, after :func:`check_private`."""
    file = check_private(path, what)
    try:
        text = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretFileError(f"{what} {file} cannot be read: {exc}") from exc
    if not text:
        raise SecretFileError(f"{what} {file} is empty")
    return text


def read_secret_bytes(path: str | Path, what: str) -> bytes:
    """The file's bytes (a TLS private key), after :func:`check_private`."""
    file = check_private(path, what)
    try:
        return file.read_bytes()
    except OSError as exc:
        raise SecretFileError(f"{what} {file} cannot be read: {exc}") from exc
