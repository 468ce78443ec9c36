"""TLS on the gRPC port for deployments outside a mesh: only verified client certificates get in."""

from __future__ import annotations

import datetime
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.harness import ROOT, free_port, stop_process, wait_until

POLICIES = ROOT / "tests" / "e2e" / "policies"


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str) -> tuple[Pem, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _pem(cert, key), key, cert


def issue(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str, server: bool
) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("policy-engine.test")]), critical=False
        )
    return _pem(builder.sign(ca_key, hashes.SHA256()), key)


def _pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    return Pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    stranger: Pem  # a client certificate from another CA


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, ca_key, ca_cert = make_ca("policy-engine test CA")
    _, other_key, other_cert = make_ca("another CA")
    return Pki(
        ca=ca,
        server=issue(ca_key, ca_cert, "policy-engine.test", server=True),
        client=issue(ca_key, ca_cert, "envoy", server=False),
        stranger=issue(other_key, other_cert, "envoy", server=False),
    )


def health(address: str, credentials: grpc.ChannelCredentials | None) -> int:
    options = [("grpc.ssl_target_name_override", "policy-engine.test")]
    if credentials is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, credentials, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)


@pytest.fixture(scope="module")
def mtls_service(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("tls")
    files = {
        "ca.pem": pki.ca.cert,
        "server.pem": pki.server.cert,
        "server-key.pem": pki.server.key,
    }
    for name, data in files.items():
        (workdir / name).write_bytes(data)
    port = free_port()
    log = workdir / "service.log"
    args = [
        sys.executable, "-m", "policy_engine", "serve", "--policies", str(POLICIES),
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
        "--tls-cert", str(workdir / "server.pem"), "--tls-key", str(workdir / "server-key.pem"),
        "--tls-client-ca", str(workdir / "ca.pem"),
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(
            args, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )
    address = f"127.0.0.1:{port}"
    good = grpc.ssl_channel_credentials(pki.ca.cert, pki.client.key, pki.client.cert)

    def serving() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"service exited:\n{log.read_text(errors='replace')}")
        try:
            return health(address, good) == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    try:
        wait_until(serving, 30, "TLS policy service")
        yield address
    finally:
        stop_process(process)


def test_a_verified_client_certificate_is_served(mtls_service: str, pki: Pki) -> None:
    good = grpc.ssl_channel_credentials(pki.ca.cert, pki.client.key, pki.client.cert)
    assert health(mtls_service, good) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("who", ["no client certificate", "certificate of another CA", "plaintext"])
def test_everyone_else_is_refused(mtls_service: str, pki: Pki, who: str) -> None:
    credentials = {
        "no client certificate": grpc.ssl_channel_credentials(pki.ca.cert),
        "certificate of another CA": grpc.ssl_channel_credentials(
            pki.ca.cert, pki.stranger.key, pki.stranger.cert
        ),
        "plaintext": None,
    }[who]
    with pytest.raises(grpc.RpcError) as refused:
        health(mtls_service, credentials)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_half_a_tls_configuration_is_a_clear_error(tmp_path: Path) -> None:
    cert = tmp_path / "server.pem"
    cert.write_text("unused")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "policy_engine",
            "serve",
            "--policies",
            str(POLICIES),
            "--tls-cert",
            str(cert),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "--tls-cert and --tls-key go together" in result.stderr
