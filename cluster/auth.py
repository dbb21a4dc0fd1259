"""The cluster token: who may talk to a node.

Everything is derived from one secret token that every member holds:
- a CA key pair (deterministic from the token): each node signs its own TLS certificate with it, and every
  connection verifies the other side's certificate against it, so only token holders can serve or connect;
- a bearer value (an HMAC of the token, never the token itself) sent with every RPC and checked by the server;
- a fingerprint (another HMAC) announced over mDNS, so that two clusters on one LAN ignore each other.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TOKEN_ENV = "CLUSTERCTL_TOKEN"
SERVER_NAME = "node.clusterctl"  # every node certificate names this; TLS checks it instead of the host address
_BEARER = "authorization"


class TokenError(ValueError):
    pass


def default_token_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or "~/.config"
    return Path(base).expanduser() / "clusterctl" / "token"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_token(path: Path, token: str) -> None:
    """Store the token readable by its owner only (mode 0600, created so, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)


def read_token_file(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise TokenError(f"cannot read the cluster token from {path}: {e.strerror}") from None
    if not token:
        raise TokenError(f"{path} is empty; it should hold the cluster token")
    return token


def resolve_token(token: str | None = None, token_file: Path | None = None, *, default_file: bool = True) -> str | None:
    """The token a command uses: --token, else --token-file, else $CLUSTERCTL_TOKEN, else the default file
    when it exists (the one `clusterctl join` created on this host)."""
    if token:
        return token.strip()
    if token_file is not None:
        return read_token_file(token_file)
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    path = default_token_path()
    if default_file and path.exists():
        return read_token_file(path)
    return None


def _derive(token: str, purpose: str) -> bytes:
    return hmac.new(token.encode(), f"clusterctl/{purpose}".encode(), hashlib.sha256).digest()


def fingerprint(token: str) -> str:
    """What nodes announce over mDNS: tells clusters apart, reveals nothing usable about the token."""
    return _derive(token, "fingerprint").hex()[:16]


def bearer(token: str) -> str:
    return _derive(token, "bearer").hex()


@dataclass(frozen=True)
class TlsIdentity:
    ca_pem: bytes  # the cluster's CA certificate (every token holder derives the same key)
    key_pem: bytes  # this process's own key and certificate, signed by the CA
    cert_pem: bytes


def _ca_key(token: str) -> ec.EllipticCurvePrivateKey:
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 group order
    scalar = int.from_bytes(_derive(token, "ca-key") + _derive(token, "ca-key-2"), "big") % (order - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "clusterctl"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@lru_cache(maxsize=8)
def tls_identity(token: str) -> TlsIdentity:
    """A fresh key and certificate for this process, signed by the token's CA."""
    ca_key = _ca_key(token)
    ca_name = _name(f"clusterctl cluster {fingerprint(token)}")
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(int(fingerprint(token), 16))
        .not_valid_before(start)
        .not_valid_after(datetime.datetime(2124, 1, 1, tzinfo=datetime.timezone.utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(SERVER_NAME))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return TlsIdentity(
        ca_pem=ca_cert.public_bytes(pem),
        key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        cert_pem=cert.public_bytes(pem),
    )


def server_credentials(token: str) -> grpc.ServerCredentials:
    """TLS that also asks each client for a certificate of the cluster (mutual TLS)."""
    ident = tls_identity(token)
    return grpc.ssl_server_credentials(
        [(ident.key_pem, ident.cert_pem)], root_certificates=ident.ca_pem, require_client_auth=True
    )


def channel_credentials(token: str) -> grpc.ChannelCredentials:
    """Verify the node against the cluster's CA, present our own certificate, and send the bearer per call."""
    ident = tls_identity(token)
    tls = grpc.ssl_channel_credentials(
        root_certificates=ident.ca_pem, private_key=ident.key_pem, certificate_chain=ident.cert_pem
    )
    calls = grpc.access_token_call_credentials(bearer(token))
    return grpc.composite_channel_credentials(tls, calls)


def channel_options() -> list[tuple[str, Any]]:
    return [("grpc.ssl_target_name_override", SERVER_NAME), ("grpc.default_authority", SERVER_NAME)]


class BearerCheck(grpc.aio.ServerInterceptor):
    """Refuse every call that does not carry the cluster's bearer value, before any handler runs."""

    def __init__(self, token: str):
        self._expected = f"Bearer {bearer(token)}"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = dict(details.invocation_metadata or ())
        given = metadata.get(_BEARER, "")
        if isinstance(given, bytes):
            given = given.decode(errors="replace")
        if hmac.compare_digest(given, self._expected):
            return await continuation(details)
        return _refusal(await continuation(details))


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same shape as the real one that only says no."""
    message = "not authorised: this node belongs to a cluster with a different token (use --token or --token-file)"

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(unary)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


def secure_channel(address: str, token: str, options: list[tuple[str, Any]]) -> grpc.Channel:
    """A blocking channel to a node of the cluster that `token` opens."""
    return grpc.secure_channel(address, channel_credentials(token), options=[*options, *channel_options()])


def secure_aio_channel(address: str, token: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, channel_credentials(token), options=[*options, *channel_options()])


def refused_message(details: str) -> str | None:
    """The user-facing reason when a connection failed because the node would not accept our credentials."""
    text = details.lower()
    if "handshake" in text or "certificate" in text or "ssl" in text:
        return (
            "not authorised: the node did not accept this cluster token (wrong or missing token; pass --token, "
            f"--token-file or set {TOKEN_ENV}, as printed by the first `clusterctl join`)"
        )
    return None
