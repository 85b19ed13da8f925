# -*- test-case-name: tests.test_tls -*-
"""
TLS material: a self-signed certificate generated on first start, and
server contexts that follow the certificate files as they are renewed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.exceptions import UnsupportedAlgorithm
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from zope.interface import implementer

from mailstack.safeio import atomic_write

log = Logger()


def generate_self_signed(hostname: str, cert_path: str, key_path: str) -> None:
    """
    Write a self-signed certificate for C{hostname} (and C{localhost},
    127.0.0.1 and ::1) with its key; the key is readable by the owner only.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=False,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(os.path.abspath(key_path)), mode=0o700, exist_ok=True)
    atomic_write(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        mode=0o600,
    )
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


class TLSMaterial:
    """
    The server's certificate and key, as a Twisted context factory that is
    rebuilt when either file changes (a renewed certificate needs no restart).
    """

    def __init__(self, cert_path: str, key_path: str) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self._signature: tuple[float, ...] | None = None
        self._options: ssl.CertificateOptions | None = None
        self.load()

    @classmethod
    def from_config(cls, data_dir: str, hostname: str, cert: str | None, key: str | None
                    ) -> "TLSMaterial":
        """
        The configured files, or the generated ones under C{DATA/tls},
        generating them if they do not exist yet.
        """
        if cert is None or key is None:
            cert = os.path.join(data_dir, "tls", "cert.pem")
            key = os.path.join(data_dir, "tls", "key.pem")
            if not (os.path.exists(cert) and os.path.exists(key)):
                log.info("generating a self-signed certificate for {hostname} in {path}",
                         hostname=hostname, path=os.path.dirname(cert))
                generate_self_signed(hostname, cert, key)
        return cls(cert, key)

    def _current_signature(self) -> tuple[float, ...]:
        c, k = os.stat(self.cert_path), os.stat(self.key_path)
        return (c.st_mtime_ns, c.st_size, c.st_ino, k.st_mtime_ns, k.st_size, k.st_ino)

    def load(self) -> None:
        """
        Read the files and build the context; raise if they are unusable.
        """
        signature = self._current_signature()
        with open(self.cert_path, "rb") as f:
            chain_pem = f.read()
        with open(self.key_path, "rb") as f:
            key_pem = f.read()
        certs = x509.load_pem_x509_certificates(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        options = ssl.CertificateOptions(
            # Typed for the key kinds TLS can use; another (X25519, DH)
            # makes PKey raise TypeError: refused like any unusable key.
            privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
            certificate=crypto.X509.from_cryptography(certs[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in certs[1:]],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
        # Built now, so a key that is not the certificate's (SSL.Error) is
        # refused here rather than at every handshake.  Idle sessions give
        # back OpenSSL's read and write buffers (about 34 KiB each), as
        # Python's ssl module does by default.
        options.getContext().set_mode(SSL.MODE_RELEASE_BUFFERS)
        self._options = options
        self._signature = signature

    def context_factory(self) -> ssl.CertificateOptions:
        """
        The context factory for a new TLS session; reloads changed files, and
        keeps the old material if the new files do not load.
        """
        try:
            if self._current_signature() != self._signature:
                self.load()
                log.info("reloaded TLS certificate {path}", path=self.cert_path)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm, crypto.Error,
                SSL.Error) as e:  # unreadable, unparsable, encrypted or unusable files
            log.error("cannot reload TLS certificate {path}: {error}; keeping the old one",
                      path=self.cert_path, error=e)
        assert self._options is not None
        return self._options


@implementer(IOpenSSLContextFactory)
class ReloadingContextFactory:
    """
    A context factory for listeners with implicit TLS: each connection gets
    the current context of a L{TLSMaterial}.
    """

    def __init__(self, material: TLSMaterial) -> None:
        self.material = material

    def getContext(self) -> SSL.Context:
        return self.material.context_factory().getContext()
