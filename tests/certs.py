"""TLS certificates made at test time (trustme): a CA, server and client certificates as files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import trustme

from scalellm.security import TlsFiles


@dataclass(frozen=True)
class Pki:
    """One CA and the files of the identities it issued, in a folder of the test's own."""

    ca: trustme.CA
    folder: Path

    @property
    def ca_file(self) -> str:
        path = self.folder / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return str(path)

    def issue(self, name: str, *hosts: str) -> TlsFiles:
        """A certificate for ``hosts`` (default: 127.0.0.1 and localhost), key mode 600, with this CA."""
        cert = self.ca.issue_cert(*(hosts or ("127.0.0.1", "localhost")))
        cert_file, key_file = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        os.chmod(key_file, 0o600)
        return TlsFiles(str(cert_file), str(key_file), self.ca_file)


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    return Pki(trustme.CA(), folder)
