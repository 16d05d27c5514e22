"""A throwaway certificate authority for TLS tests and benchmarks, made at run time.

:func:`make_pki` writes a CA, a server certificate for ``127.0.0.1`` and
``localhost`` (what a one-host cluster listens on and advertises) and a client
certificate, all signed by the CA, as PEM files in one directory; plus a
server certificate for another host, to show that clients check names.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    """PEM paths: the CA, and the pairs it signed."""

    ca: str
    server_cert: str  # 127.0.0.1 and localhost
    server_key: str
    client_cert: str
    client_key: str
    elsewhere_cert: str  # a server certificate for elsewhere.invalid only
    elsewhere_key: str


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sdcache tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, cn: str, *,
           san: list[x509.GeneralName] | None, usages: list[x509.ObjectIdentifier]) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                      data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                      crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = _name(cn)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_pki(directory: str | os.PathLike[str], name: str = "sdcache test CA") -> Pki:
    """A fresh CA and the server and client certificates it signs, under *directory*.

    The server certificate carries SAN IP 127.0.0.1 and DNS localhost and may
    also act as a client (servers call each other: node -> meta, meta -> node).
    """
    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    ca_key, ca = _ca(name)
    server_cert, server_key = _issue(
        ca_key, ca.subject, "sdcache server",
        san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    client_cert, client_key = _issue(ca_key, ca.subject, "sdcache client", san=None,
                                     usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    elsewhere_cert, elsewhere_key = _issue(
        ca_key, ca.subject, "elsewhere.invalid", san=[x509.DNSName("elsewhere.invalid")],
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    return Pki(
        ca=_write(os.path.join(d, "ca.pem"), ca.public_bytes(serialization.Encoding.PEM)),
        server_cert=_write(os.path.join(d, "server.pem"), server_cert),
        server_key=_write(os.path.join(d, "server.key"), server_key),
        client_cert=_write(os.path.join(d, "client.pem"), client_cert),
        client_key=_write(os.path.join(d, "client.key"), client_key),
        elsewhere_cert=_write(os.path.join(d, "elsewhere.pem"), elsewhere_cert),
        elsewhere_key=_write(os.path.join(d, "elsewhere.key"), elsewhere_key),
    )
