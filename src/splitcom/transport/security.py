"""TLS credentials and per-client tokens for the gRPC transport.

Tokens: a YAML (or JSON) mapping ``client id -> token``. The client sends its id and token as call
metadata; the server compares the token with the one issued for that id in constant time, so a client
cannot act as another id without that id's secret. TLS (server authentication, optional mutual TLS)
keeps the tokens and tensors private on the wire; without TLS the server warns unless it only listens
on loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
from pathlib import Path

import grpc
import yaml

from splitcom.errors import UserError

log = logging.getLogger("splitcom.security")
TOKEN_KEY = "authorization"  # value "Bearer <token>"
CLIENT_KEY = "x-splitcom-client-id"


class AuthError(Exception):
    """An authentication failure; ``code`` is the gRPC status the server answers with."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED):
        self.code = code
        super().__init__(message)


def load_tokens(path: str | Path) -> dict[int, str]:
    p = Path(path)
    if not p.is_file():
        raise UserError("tokens file not found", where=str(p))
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"not valid YAML/JSON ({err})", where=str(p)) from None
    if not isinstance(raw, dict) or not raw:
        raise UserError("must map client ids to tokens, e.g. `0: s3cret`", where=str(p))
    tokens: dict[int, str] = {}
    for key, value in raw.items():
        try:
            cid = int(key)
        except (TypeError, ValueError):
            raise UserError(f"client id {key!r} is not an integer", where=str(p)) from None
        if not isinstance(value, str) or len(value) < 8:
            raise UserError(f"token of client {cid} must be a string of at least 8 characters", where=str(p))
        tokens[cid] = value
    return tokens


def generate_tokens(num_clients: int) -> dict[int, str]:
    return {cid: secrets.token_urlsafe(24) for cid in range(num_clients)}


def write_tokens(path: str | Path, tokens: dict[int, str]) -> None:
    """Write the tokens readable by the owner only (they are secrets)."""
    p = Path(path)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yaml.safe_dump({int(k): v for k, v in tokens.items()}, fh)


class TokenAuth:
    """Maps call metadata to an authenticated client id."""

    def __init__(self, tokens: dict[int, str]):
        self.tokens = {int(k): v.encode() for k, v in tokens.items()}

    def authenticate(self, metadata) -> int:
        md = {k.lower(): v for k, v in (metadata or ())}
        raw_id, auth = md.get(CLIENT_KEY), md.get(TOKEN_KEY)
        if raw_id is None or auth is None:
            raise AuthError(f"missing {CLIENT_KEY!r} or {TOKEN_KEY!r} metadata: a client id and its token "
                            "are required")
        try:
            cid = int(raw_id)
        except ValueError:
            raise AuthError(f"client id {raw_id!r} is not an integer") from None
        token = auth.removeprefix("Bearer ").encode()
        expected = self.tokens.get(cid)
        # Compare against a dummy for unknown ids too, so timing does not reveal which ids exist.
        ok = hmac.compare_digest(token, expected if expected is not None else b"\0" * len(token))
        if expected is None or not ok:
            raise AuthError(f"invalid token for client id {cid}")
        return cid


def call_metadata(client_id: int, token: str) -> tuple[tuple[str, str], ...]:
    return ((CLIENT_KEY, str(client_id)), (TOKEN_KEY, f"Bearer {token}"))


def _read(path: str | Path | None, what: str, pem: bytes = b"-----BEGIN ") -> bytes | None:
    """A PEM file's bytes; a missing file or one that is not PEM is a UserError naming it (gRPC would only
    fail later, at the first handshake, with a message that names nothing)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file not found", where=str(p))
    data = p.read_bytes()
    if pem not in data:
        raise UserError(f"{what} file is not PEM (no '{pem.decode().strip()}' block)", where=str(p))
    return data


def tls_mismatch(address: str, ca: str | Path | None, timeout: float = 3.0) -> str | None:
    """Why a connection that failed will keep failing, if it is a TLS mistake: the server speaks TLS and the
    client does not, or the other way round, or the server's certificate is not signed by ``ca``. None when
    the server is simply not there (yet) or the handshake works. One TLS handshake with Python's ssl."""
    import socket
    import ssl

    host, port = split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout)
    except OSError:
        return None  # not listening (yet): worth retrying
    ctx = ssl.create_default_context(cafile=str(ca)) if ca is not None else ssl._create_unverified_context()  # noqa: S323
    ctx.check_hostname = False  # gRPC checks the name; here only the chain matters
    ctx.set_alpn_protocols(["h2"])
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            tls.settimeout(timeout)
        return f"the server at {address} speaks TLS: pass --tls-ca (the CA that signed its certificate)" \
            if ca is None else None
    except ssl.SSLCertVerificationError as err:
        return f"certificate verify failed (wrong CA? --tls-ca {ca}): {err.verify_message}"
    except (ssl.SSLError, OSError):
        return None if ca is None else f"the server at {address} does not speak TLS (drop --tls-ca, or give the " \
            "server --tls-cert/--tls-key)"
    finally:
        sock.close()


def server_credentials(cert: str | Path | None, key: str | Path | None,
                       client_ca: str | Path | None = None) -> grpc.ServerCredentials | None:
    """TLS with the server's certificate; with ``client_ca``, mutual TLS (clients need a certificate
    signed by that CA). None when no certificate is given (plaintext)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise UserError("mutual TLS needs the server's own --tls-cert and --tls-key", where="--tls-client-ca")
        return None
    if cert is None or key is None:
        raise UserError("TLS needs both --tls-cert and --tls-key", where="--tls-cert" if cert is None else "--tls-key")
    ca = _read(client_ca, "client CA", b"-----BEGIN CERTIFICATE-----")
    return grpc.ssl_server_credentials([(_read(key, "TLS key", b"PRIVATE KEY-----"),
                                         _read(cert, "TLS certificate", b"-----BEGIN CERTIFICATE-----"))],
                                       root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(ca: str | Path | None, cert: str | Path | None = None,
                        key: str | Path | None = None) -> grpc.ChannelCredentials | None:
    """TLS trusting ``ca`` (None: plaintext); ``cert``/``key``: the client's own certificate for mTLS."""
    if ca is None:
        if cert is not None or key is not None:
            raise UserError("a client certificate needs TLS: give --tls-ca too", where="--tls-ca")
        return None
    if (cert is None) != (key is None):
        raise UserError("mutual TLS needs both --tls-cert and --tls-key", where="--tls-cert")
    return grpc.ssl_channel_credentials(root_certificates=_read(ca, "CA certificate", b"-----BEGIN CERTIFICATE-----"),
                                        private_key=_read(key, "TLS key", b"PRIVATE KEY-----"),
                                        certificate_chain=_read(cert, "TLS certificate", b"-----BEGIN CERTIFICATE-----"))


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); UserError naming the address otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError("expected HOST:PORT, e.g. 127.0.0.1:50051", where=address)
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plaintext_warning(host: str, secure: bool) -> str | None:
    """The warning to print when serving (or connecting) without TLS off loopback, else None."""
    if secure or is_loopback(host):
        return None
    return (f"no TLS on {host}: tokens, activations and adapters cross the network in clear text; "
            "pass --tls-cert/--tls-key (server) and --tls-ca (client)")
