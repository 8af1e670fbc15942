"""What keeps the mesh's internal doors shut: the mesh token, mutual TLS, secret files.

    token.py        MeshToken: the shared secret, compared in constant time, derived keys
    files.py        secret files (API keys, token, TLS keys) refused when others can read them
    tls.py          TlsFiles -> gRPC credentials and ssl contexts (TLS and mutual TLS)
    interceptor.py  TokenInterceptor: the one server-side check of every internal gRPC call
    mesh.py         SecurityConfig (shared flags) -> MeshSecurity (servers, channels, metadata)
    metrics.py      scalellm_mesh_auth_failures_total{reason}, the refusals every server counts

No torch here: the gateway and the kvstore use it too. See docs/deploy.md, "Security".
"""

from scalellm.security.files import SecretFileError, check_private, read_secret
from scalellm.security.interceptor import TokenInterceptor
from scalellm.security.mesh import SECURITY_OPTIONS, MeshSecurity, SecurityConfig
from scalellm.security.tls import TlsFiles, TlsMaterial
from scalellm.security.token import METADATA_KEY, MeshToken

__all__ = [
    "METADATA_KEY",
    "SECURITY_OPTIONS",
    "MeshSecurity",
    "MeshToken",
    "SecretFileError",
    "SecurityConfig",
    "TlsFiles",
    "TlsMaterial",
    "TokenInterceptor",
    "check_private",
    "read_secret",
]
