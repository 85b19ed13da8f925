"""
Tests for L{mailstack.tls}: the generated certificate and reloading.
"""

import os

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from mailstack.tls import TLSMaterial, generate_self_signed


class TLSMaterialTests(SynchronousTestCase):
    def setUp(self):
        self.data = os.path.abspath(self.mktemp())

    def test_generated_once(self):
        """
        The first start generates a certificate for the host name with a
        private key file; the next start reuses them.
        """
        material = TLSMaterial.from_config(self.data, "mx.test", None, None)
        self.assertEqual(material.cert_path, os.path.join(self.data, "tls", "cert.pem"))
        self.assertEqual(os.stat(material.key_path).st_mode & 0o777, 0o600)
        with open(material.cert_path, "rb") as f:
            pem = f.read()
        cert = x509.load_pem_x509_certificate(pem)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn("mx.test", names.get_values_for_type(x509.DNSName))
        TLSMaterial.from_config(self.data, "mx.test", None, None)
        with open(material.cert_path, "rb") as f:
            self.assertEqual(f.read(), pem)

    def test_reload(self):
        """
        New files are picked up by the next context; unreadable ones are
        ignored and the old context kept.
        """
        material = TLSMaterial.from_config(self.data, "mx.test", None, None)
        first = material.context_factory()
        self.assertIs(material.context_factory(), first)
        generate_self_signed("renewed.test", material.cert_path, material.key_path)
        second = material.context_factory()
        self.assertIsNot(second, first)
        with open(material.cert_path, "w") as f:
            f.write("garbage")
        self.assertIs(material.context_factory(), second)
        self.flushLoggedErrors()

    def test_reload_each_kind_of_broken_file(self):
        """
        Every way a renewal can leave the files unusable keeps the old
        context (the reload catches exactly these): a missing key, a
        certificate with no PEM block, a key protected by a password, a key
        of another certificate, a PEM of the wrong kind.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        material = TLSMaterial.from_config(self.data, "mx.test", None, None)
        good = material.context_factory()
        with open(material.cert_path, "rb") as f:
            cert_pem = f.read()
        with open(material.key_path, "rb") as f:
            key_pem = f.read()
        other = ec.generate_private_key(ec.SECP256R1())
        broken = {
            "missing key": None,
            "no certificate": (b"", key_pem),
            "encrypted key": (cert_pem, other.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"))),
            "another key": (cert_pem, other.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())),
            "certificate as key": (cert_pem, cert_pem),
        }
        for what, files in broken.items():
            if files is None:
                os.remove(material.key_path)
            else:
                for path, content in zip((material.cert_path, material.key_path), files):
                    with open(path, "wb") as f:
                        f.write(content)
            self.assertIs(material.context_factory(), good, what)
            for path, content in ((material.cert_path, cert_pem), (material.key_path, key_pem)):
                with open(path, "wb") as f:
                    f.write(content)
