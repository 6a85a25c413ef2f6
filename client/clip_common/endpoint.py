"""Server URLs: the scheme picks the protocol and TLS (http, https, grpc, grpcs); a bare host:port keeps a default.

Shared by the client, its CLI and the locustfile, so `--url` / `--host` mean the same everywhere.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

# scheme -> (protocol, TLS)
SCHEMES = {"http": ("http", False), "https": ("http", True), "grpc": ("grpc", False), "grpcs": ("grpc", True)}
PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}  # Triton's own defaults, used when no URL is given at all
DEFAULT_HOST = "127.0.0.1"


class EndpointError(ValueError):
    """A server URL that cannot be used (unknown scheme, bad port, conflicting protocol)."""


@dataclass(frozen=True)
class Endpoint:
    """Where a Triton server listens and how to talk to it."""

    protocol: str  # "http" | "grpc"
    tls: bool
    host: str  # as written, IPv6 in brackets
    port: int | None  # None: the library's default for the scheme (80 / 443)
    path: str = ""  # HTTP only: a prefix in front of /v2 (a reverse proxy's route)

    @property
    def scheme(self) -> str:
        """http, https, grpc or grpcs."""
        return self.protocol + ("s" if self.tls else "")

    @property
    def address(self) -> str:
        """host:port[/path], the form tritonclient takes."""
        return self.host + (f":{self.port}" if self.port is not None else "") + self.path

    @property
    def url(self) -> str:
        """The canonical URL, scheme included."""
        return f"{self.scheme}://{self.address}"

    @property
    def effective_port(self) -> int:
        """The port actually dialled (the scheme's standard one when the URL has none)."""
        if self.port is not None:
            return self.port
        return 443 if self.tls or self.protocol == "grpc" else 80

    def __str__(self) -> str:
        return self.url


def parse_endpoint(url: str | None, protocol: str | None = None, default_protocol: str = "grpc") -> Endpoint:
    """A server URL -> Endpoint.

    `scheme://host[:port]` picks the protocol from the scheme (http, https, grpc, grpcs); a bare `host[:port]` uses
    `protocol`, else `default_protocol`; no URL at all means 127.0.0.1 on Triton's default port of that protocol.
    A `protocol` that contradicts the scheme, an unknown scheme or a bad port is an EndpointError.
    """
    if protocol is not None:
        protocol = protocol.lower()
        if protocol not in PROTOCOLS:
            raise EndpointError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    if default_protocol not in PROTOCOLS:
        raise EndpointError(f"default protocol must be 'grpc' or 'http', got {default_protocol!r}")
    if url is None or not url.strip():
        chosen = protocol or default_protocol
        return Endpoint(chosen, False, DEFAULT_HOST, DEFAULT_PORTS[chosen])
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    if sep:
        key = scheme.lower()
        if key not in SCHEMES:
            raise EndpointError(
                f"unknown URL scheme {scheme!r} in {text!r}: use http://, https://, grpc:// or grpcs://"
            )
        chosen, tls = SCHEMES[key]
        if protocol is not None and protocol != chosen:
            raise EndpointError(f"{text!r} is a {chosen} URL but protocol={protocol!r} was asked for")
    else:
        rest, chosen, tls = text, protocol or default_protocol, False
    authority, slash, path = rest.partition("/")
    path = (slash + path).rstrip("/")
    if path and chosen == "grpc":
        raise EndpointError(f"{text!r}: a gRPC URL cannot have a path ({path!r})")
    host, port = _split_host_port(authority, text)
    return Endpoint(chosen, tls, host, port, path)


def _split_host_port(authority: str, text: str) -> tuple[str, int | None]:
    """'host:port' / '[::1]:port' / 'host' -> (host, port or None)."""
    if "@" in authority:
        raise EndpointError(f"{text!r}: credentials in the URL are not supported (use headers)")
    if authority.startswith("["):  # IPv6 literal
        end = authority.find("]")
        if end < 0:
            raise EndpointError(f"{text!r}: unterminated IPv6 address")
        host, tail = authority[: end + 1], authority[end + 1 :]
        if tail and not tail.startswith(":"):
            raise EndpointError(f"{text!r}: unexpected {tail!r} after the IPv6 address")
        port_text = tail[1:] if tail else None
    else:
        host, colon, port_text = authority.partition(":")
        if not colon:
            port_text = None
    if not host:
        raise EndpointError(f"{text!r}: no host")
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise EndpointError(f"{text!r}: port must be a number from 1 to 65535, got {port_text!r}")
    return host, int(port_text)


def system_ca_file() -> str | None:
    """The system's CA bundle (OpenSSL's default file, or $SSL_CERT_FILE), or None when there is none."""
    return ssl.get_default_verify_paths().cafile


def tritonclient_tls(endpoint: Endpoint, ca_file: str | None = None) -> dict:
    """TLS keyword arguments of tritonclient's InferenceServerClient (grpc, grpc.aio, http) for `endpoint`.

    TLS endpoints trust `ca_file` when given, else the system's CA bundle (gRPC without one, or with
    $GRPC_DEFAULT_SSL_ROOTS_FILE_PATH set: gRPC's own roots). tritonclient.http.aio takes an SSLContext instead.
    """
    if not endpoint.tls:
        return {}
    if endpoint.protocol == "grpc":
        roots = ca_file or (None if os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH") else system_ca_file())
        return {"ssl": True, "root_certificates": roots}
    ca = ca_file or system_ca_file()
    return {"ssl": True, "ssl_options": {"ca_certs": ca} if ca else None}
