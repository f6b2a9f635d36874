"""The processor's signing key for OpenDSR: callbacks and answers are signed SHA256-RSA, and controllers verify
them with the X.509 certificate that `GET /v3/discovery` points to.

One RSA key pair per deployment, generated on first use and kept beside the database like the master key
(engine/secrets.py): `<db>.opendsr-key.pem` (0600, never logged or served) and `<db>.opendsr-cert.pem`, a
self-signed certificate for the processor domain. OpenDSR asks for a certificate issued by a trusted CA: an
operator can replace the certificate file with one a CA issued for the same key (make the CSR with
`openssl req -new -key <db>.opendsr-key.pem`); start-up refuses a certificate that does not match the key.
"""

from __future__ import annotations

import base64
import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

KEY_BITS = 2048
CERTIFICATE_DAYS = 3650


class ProcessorKeys:
    def __init__(self, private_key: rsa.RSAPrivateKey, certificate_pem: bytes) -> None:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
        if certificate.public_key().public_numbers() != private_key.public_key().public_numbers():
            raise ValueError("the OpenDSR certificate does not belong to the OpenDSR private key")
        self._private_key = private_key
        self.certificate_pem = certificate_pem

    @classmethod
    def beside(cls, db_path: str | None, domain: str) -> ProcessorKeys:
        """The deployment's keys, created on first use; an in-memory database gets keys of its own run only."""
        if db_path is None:
            key = _new_key()
            return cls(key, _self_signed(key, domain))
        key_file, cert_file = Path(db_path + ".opendsr-key.pem"), Path(db_path + ".opendsr-cert.pem")
        if not key_file.exists():
            pem = _new_key().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{key_file} must hold an RSA private key")
        if not cert_file.exists():
            cert_file.write_bytes(_self_signed(key, domain))
        return cls(key, cert_file.read_bytes())

    def sign(self, body: bytes) -> str:
        """Base64 of the PKCS#1 v1.5 SHA-256 RSA signature of `body`, for X-OpenDSR-Signature."""
        return base64.b64encode(self._private_key.sign(body, padding.PKCS1v15(), hashes.SHA256())).decode()


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def _self_signed(key: rsa.RSAPrivateKey, domain: str) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "idmesh OpenDSR processor")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder()
                   .subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=False, crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM)
