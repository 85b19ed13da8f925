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
