"""SecurityConfig (the mesh-wide flags every service shares) and MeshSecurity (what they load to).

    SecurityConfig   --mesh-token / SCALELLM_MESH_TOKEN, --mesh-token-file, --mesh-tls-{cert,key,ca},
                     --mesh-tls-server-name: strings, validated, never read at import
        .load()  ->  MeshSecurity: the token and the TLS material, read once per process
                       server side: server(on_refused), add_port(server, address)
                       client side: channel(address), metadata (pass it on every call)
                       KV transfer: transfer_key

Both ends ping each other (scalellm/keepalive.py): server() and channel() set the options.

Mesh TLS is all or nothing: a certificate, its key and the CA that signed every service's
certificate. Then every internal listener serves TLS and requires a client certificate from that
CA, and every internal client verifies its server against it and presents its own (mutual TLS).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from scalellm import keepalive
from scalellm.security.files import read_secret
from scalellm.security.interceptor import RefusalCounter, TokenInterceptor
from scalellm.security.tls import TlsFiles, TlsMaterial
from scalellm.security.token import METADATA_KEY, MeshToken
from scalellm.settings import Option, parse_config

TRANSFER_KEY_LABEL = "kv-transfer"


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityConfig:
    """The mesh's shared secret and internal TLS, as flags (same variables for every service)."""

    mesh_token: str | None = field(default=None, repr=False)
    """Prefer SCALELLM_MESH_TOKEN or --mesh-token-file: a flag shows in `ps`."""
    mesh_token_file: str | None = None
    mesh_tls_cert: str | None = None
    mesh_tls_key: str | None = None
    mesh_tls_ca: str | None = None
    mesh_tls_server_name: str | None = None
    """The name every internal server's certificate carries, when it is not the dialled host."""

    def __post_init__(self) -> None:
        if self.mesh_token and self.mesh_token_file:
            raise ValueError("give the mesh token once: --mesh-token or --mesh-token-file, not both")
        if self.mesh_token:
            MeshToken(self.mesh_token)  # validate now: a bad token is a usage error
        tls = (self.mesh_tls_cert, self.mesh_tls_key, self.mesh_tls_ca)
        if any(tls) and not all(tls):
            raise ValueError("mesh TLS needs all of --mesh-tls-cert, --mesh-tls-key and --mesh-tls-ca")
        if self.mesh_tls_server_name and not all(tls):
            raise ValueError("--mesh-tls-server-name needs mesh TLS (--mesh-tls-cert, -key, -ca)")

    @property
    def tls_files(self) -> TlsFiles | None:
        if self.mesh_tls_cert and self.mesh_tls_key and self.mesh_tls_ca:
            return TlsFiles(self.mesh_tls_cert, self.mesh_tls_key, self.mesh_tls_ca)
        return None

    def load(self) -> MeshSecurity:
        """Read the token file and the TLS files (once per process and config); ValueError
        (SecretFileError) if one is missing, empty or readable by other users."""
        return _load(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SecurityConfig:
        """The SCALELLM_MESH_* variables alone (health probes, tools)."""
        return parse_config(cls, SECURITY_OPTIONS, [], environ, prog="scalellm")


@functools.cache
def _load(config: SecurityConfig) -> MeshSecurity:
    secret = config.mesh_token
    if config.mesh_token_file:
        secret = read_secret(config.mesh_token_file, "mesh token file")
    files = config.tls_files
    return MeshSecurity(
        token=MeshToken(secret) if secret else None,
        tls=files.read() if files else None,
        server_name=config.mesh_tls_server_name,
    )


@dataclass(frozen=True, slots=True)
class MeshSecurity:
    """What internal servers check and internal clients present. The default is open: no token,
    plaintext (what a service without security flags runs with)."""

    token: MeshToken | None = None
    tls: TlsMaterial | None = None
    server_name: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata every internal call must carry (empty without a token)."""
        return ((METADATA_KEY, self.token.value),) if self.token else ()

    @property
    def transfer_key(self) -> bytes | None:
        """The HMAC key of KV-transfer pairs (derived from the token), or None."""
        return self.token.derive(TRANSFER_KEY_LABEL) if self.token else None

    def interceptors(self, on_refused: RefusalCounter | None = None) -> list[grpc.aio.ServerInterceptor]:
        """The token check for an internal server, first in its interceptor chain."""
        return [TokenInterceptor(self.token, on_refused)] if self.token else []

    def server(
        self,
        on_refused: RefusalCounter | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> grpc.aio.Server:
        """An internal server: the token check first, then ``interceptors``; keepalive pings."""
        chain = [*self.interceptors(on_refused), *interceptors]
        return grpc.aio.server(interceptors=chain, options=keepalive.SERVER_OPTIONS)

    def add_port(self, server: grpc.aio.Server | grpc.Server, address: str) -> int:
        """Bind ``address`` (mutual TLS when configured); the bound port."""
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.tls.server_credentials())

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """An asyncio channel to an internal service (TLS with our certificate when configured),
        with keepalive pings; ``options`` add to or override keepalive's."""
        options = list({**dict(keepalive.CHANNEL_OPTIONS), **dict(options)}.items())
        if self.tls is None:
            return grpc.aio.insecure_channel(address, options=list(options))
        return grpc.aio.secure_channel(address, self.tls.channel_credentials(), self._tls_options(options))

    def sync_channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking channel (probes, tools)."""
        if self.tls is None:
            return grpc.insecure_channel(address, options=list(options))
        return grpc.secure_channel(address, self.tls.channel_credentials(), self._tls_options(options))

    def _tls_options(self, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        if self.server_name:
            return [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return list(options)


def _env(flag: str) -> str:
    return "SCALELLM_" + flag.lstrip("-").replace("-", "_").upper()


def _option(flag: str, field_name: str, help_: str) -> Option:
    return Option(flag, field_name, str, help_, env=_env(flag))


SECURITY_OPTIONS = (
    _option("--mesh-token", "mesh_token", "shared secret of internal calls (prefer the variable)"),
    _option("--mesh-token-file", "mesh_token_file", "file holding the mesh token (mode 600 or 640)"),
    _option("--mesh-tls-cert", "mesh_tls_cert", "this service's certificate for mesh mutual TLS"),
    _option("--mesh-tls-key", "mesh_tls_key", "its private key (mode 600 or 640)"),
    _option("--mesh-tls-ca", "mesh_tls_ca", "CA that signed every mesh service's certificate"),
    _option("--mesh-tls-server-name", "mesh_tls_server_name", "name in the services' certificates"),
)
"""SecurityConfig's flags (SCALELLM_MESH_TOKEN, ...); every service adds them as
``settings.nested("security", SECURITY_OPTIONS)``, into its config's ``security`` field."""
