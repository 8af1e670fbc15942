"""TLS identities as files, turned into gRPC credentials and ``ssl`` contexts.

One :class:`TlsFiles` names a certificate chain and its private key, and optionally a CA:

- on a server, a CA means mutual TLS: every client must present a certificate that CA signed;
- on a client, the CA is what the server's certificate must chain to, and the certificate and key
  are presented to the server (mutual TLS).

The private key is read through :func:`~scalellm.security.files.read_secret_bytes`, so a key
file other users can read is refused.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from scalellm.security.files import SecretFileError, check_private, read_secret_bytes


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths of a PEM certificate chain, its private key and (optionally) a CA bundle."""

    cert: str
    key: str
    ca: str | None = None

    def read(self) -> TlsMaterial:
        """The files' contents; SecretFileError if one is missing or the key is not private."""
        return TlsMaterial(
            _read_public(self.cert, "TLS certificate"),
            read_secret_bytes(self.key, "TLS private key"),
            _read_public(self.ca, "TLS CA bundle") if self.ca else None,
        )

    def server_context(self) -> ssl.SSLContext:
        """An ``ssl`` context for an HTTPS server (aiohttp), TLS 1.2 or later; with a CA, clients
        must present a certificate it signed."""
        check_private(self.key, "TLS private key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.ca:
                context.load_verify_locations(self.ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise SecretFileError(f"cannot load TLS certificate {self.cert} / key {self.key}: {exc}") from exc
        return context


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The PEM bytes of a :class:`TlsFiles`."""

    cert: bytes
    key: bytes = field(repr=False)
    ca: bytes | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve TLS; with a CA, require and verify client certificates (mutual TLS)."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Verify the server against the CA (the system's roots without one) and present our
        certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def _read_public(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecretFileError(f"{what} {path}: {exc.strerror or exc}") from exc
