"""TLS settings shared by every process: ``--tls-cert``, ``--tls-key``, ``--tls-ca``.

One :class:`TlsFiles` per process serves both directions: a server presents
*cert*/*key* and, with ``--tls-require-client-cert``, requires client
certificates signed by *ca* (mutual TLS); a client verifies servers against
*ca* and presents *cert*/*key* when it has them. Clients without flags read
``$SDCACHE_TLS_CA``, ``$SDCACHE_TLS_CERT`` and ``$SDCACHE_TLS_KEY``; servers
take only their flags. With TLS on, nodes are reached over ``https://`` and
the metadata service over a secure gRPC channel; a fleet runs TLS everywhere
or nowhere.

A server certificate must name the address its peers dial (SAN IP or DNS:
``--listen``/``--advertise`` of a node, the ``--meta`` clients use). Servers
call each other (node -> metadata service, metadata service -> node) with
their own certificate, so under mutual TLS it must also allow client use:
extendedKeyUsage ``clientAuth`` as well as ``serverAuth`` (or none at all);
a serverAuth-only certificate is refused as "unsupported certificate purpose".
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from .auth import resolve_token
from .errors import InvalidArgument

ENV = {"ca": "SDCACHE_TLS_CA", "cert": "SDCACHE_TLS_CERT", "key": "SDCACHE_TLS_KEY"}


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM file paths; any may be None."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise InvalidArgument("--tls-cert and --tls-key go together")
        for what in ("cert", "key", "ca"):
            path = getattr(self, what)
            if path and not os.path.isfile(path):
                raise InvalidArgument(f"--tls-{what} {path}: no such file")

    @classmethod
    def resolve(cls, cert: str | None = None, key: str | None = None, ca: str | None = None,
                env: Mapping[str, str] | None = None) -> TlsFiles | None:
        """Flags, else the environment; None when neither names anything."""
        env = os.environ if env is None else env
        if not (cert or key or ca):
            cert, key, ca = env.get(ENV["cert"]), env.get(ENV["key"]), env.get(ENV["ca"])
        if not (cert or key or ca):
            return None
        return cls(cert or None, key or None, ca or None)

    def read(self, what: str) -> bytes | None:
        path = getattr(self, what)
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """For an HTTPS server: our certificate; with *require_client_cert*, mutual TLS against *ca*."""
        if not self.cert:
            raise InvalidArgument("a TLS server needs --tls-cert and --tls-key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if require_client_cert:
            if not self.ca:
                raise InvalidArgument("--tls-require-client-cert needs --tls-ca to verify clients with")
            ctx.load_verify_locations(self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """For an HTTPS client: verify against *ca* (else the system store); present our cert if any."""
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a calling process presents: its bearer token and its TLS files."""

    token: str | None = None
    tls: TlsFiles | None = None

    @classmethod
    def resolve(cls, token_file: str | None = None, *, token: str | None = None, tls_cert: str | None = None,
                tls_key: str | None = None, tls_ca: str | None = None) -> Credentials:
        """Explicit values, else the contract's flags-then-environment order."""
        return cls(token or resolve_token(token_file), TlsFiles.resolve(tls_cert, tls_key, tls_ca))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Credentials:
        return cls.resolve(getattr(args, "token_file", None), tls_cert=getattr(args, "tls_cert", None),
                           tls_key=getattr(args, "tls_key", None), tls_ca=getattr(args, "tls_ca", None))

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def export_to_env(args: argparse.Namespace) -> None:
    """Make ``--token-file`` and ``--tls-*`` this process's defaults for every client it creates.

    For commands (``sdcache run``) whose clients are made deep inside
    libraries (fsspec URLs): they resolve the environment, as the contract says.
    """
    token_file = getattr(args, "token_file", None)
    if token_file:
        os.environ["SDCACHE_TOKEN"] = resolve_token(token_file) or ""
    for what, var in ENV.items():
        value = getattr(args, f"tls_{what}", None)
        if value:
            os.environ[var] = os.path.abspath(value)


def add_arguments(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """``--token-file`` and the three TLS flags (contract), on any command that calls another."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--token-file", metavar="FILE", default=default,
                        help="bearer token file (else $SDCACHE_TOKEN, else $SDCACHE_TOKEN_FILE)")
    parser.add_argument("--tls-cert", metavar="PEM", default=default, help="TLS certificate (else $SDCACHE_TLS_CERT)")
    parser.add_argument("--tls-key", metavar="PEM", default=default, help="TLS private key (else $SDCACHE_TLS_KEY)")
    parser.add_argument("--tls-ca", metavar="PEM", default=default,
                        help="CA to verify peers with (else $SDCACHE_TLS_CA)")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The client flags plus mutual TLS, for ``meta`` and ``node``."""
    add_arguments(parser)
    parser.add_argument("--tls-require-client-cert", action="store_true",
                        help="mutual TLS: refuse clients without a certificate signed by --tls-ca")
