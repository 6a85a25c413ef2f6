"""Image URLs fetched for the OpenAI front end, guarded against SSRF.

Only http/https; every address a host name resolves to must be public (not loopback, private, link-local, shared,
multicast, reserved or unspecified) unless private targets are allowed, and the connection goes to the address that was
checked (no second DNS lookup, so a rebinding name cannot swap it); redirects are followed by hand, each hop checked
the same way and none to another scheme; one total deadline and a byte cap over the whole fetch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import httpcore

MAX_REDIRECTS = 5
USER_AGENT = "clip-triton-openai/1"


class FetchError(ValueError):
    """An image URL that may not or could not be fetched (the message is safe to show the caller)."""


@dataclass(frozen=True)
class FetchPolicy:
    """What the front end may fetch: private targets, total deadline (s), largest body (bytes)."""

    allow_private: bool = False
    deadline: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    networks: tuple[str, ...] = ()  # CIDRs allowed although not public (an internal image store)

    def allows(self, address: str) -> bool:
        """Whether an IP address may be connected to."""
        return address_allowed(address, self.allow_private, self.networks)


def address_allowed(address: str, allow_private: bool, networks: Iterable[str] = ()) -> bool:
    """Whether an IP address may be connected to: public unicast only, unless private targets are allowed or the
    address is in one of `networks` (IPv4-mapped, 6to4 and Teredo IPv6 addresses are judged by their IPv4 too)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None) or _embedded_ipv4(ip)
        if mapped is not None and not address_allowed(str(mapped), allow_private, networks):
            return False
    if ip.is_multicast or ip.is_unspecified:
        return False
    if allow_private or any(ip in ipaddress.ip_network(n, strict=False) for n in networks):
        return True
    return ip.is_global and ip not in _LOCAL_NAT64


_EMBEDDING_V4 = tuple(  # IPv6 prefixes whose last 32 bits are an IPv4 address a gateway or the kernel may reach
    ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96")
)
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a site's own translator, not public


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside a NAT64 (RFC 6052/8215), IPv4-compatible or IPv4-translated IPv6 address."""
    if int(ip) >> 32 == 0 and int(ip) <= 1:  # :: and ::1 are judged as themselves
        return None
    if any(ip in net for net in _EMBEDDING_V4):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend: resolve the host once, check every address, connect to a checked one."""

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await _resolve(host, port)
        refused = [a for a in addresses if not self.policy.allows(a)]
        if refused:
            raise FetchError(
                f"image URL host {host!r} resolves to a loopback, private, link-local or otherwise "
                "non-public address: refused (--allow-private-urls allows it)"
            )
        last: Exception | None = None
        for address in addresses:  # each one checked above; no name is resolved again
            try:
                return await self.inner.connect_tcp(address, port, timeout=timeout, socket_options=socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        raise FetchError(f"cannot connect to image URL host {host!r}: {last}")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


async def _resolve(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(f"cannot resolve image URL host {host!r}: {exc}") from None
    found = list(dict.fromkeys(info[4][0] for info in infos))
    if not found:
        raise FetchError(f"image URL host {host!r} has no address")
    return found


class ImageFetcher:
    """Fetches image URLs under a FetchPolicy; one connection pool for the front end's lifetime."""

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self.pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl.create_default_context(),
            max_connections=64,
            network_backend=_GuardedBackend(policy),
            retries=0,
        )

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def fetch(self, url: str, max_bytes: int | None = None) -> bytes:
        """The body of `url` (following checked redirects; at most max_bytes, default the policy's), or FetchError."""
        cap = min(max_bytes or self.policy.max_bytes, self.policy.max_bytes)
        try:
            async with asyncio.timeout(self.policy.deadline):
                return await self._fetch(url, cap)
        except TimeoutError:
            raise FetchError(f"image URL not fetched within {self.policy.deadline:g} s") from None
        except httpcore.TimeoutException:
            raise FetchError(f"image URL not fetched within {self.policy.deadline:g} s") from None
        except httpcore.UnsupportedProtocol:
            raise FetchError("image URLs must be http:// or https://") from None
        except (httpcore.NetworkError, httpcore.ProtocolError, ssl.SSLError, OSError) as exc:
            raise FetchError(f"cannot fetch image URL: {type(exc).__name__}") from None
        except FetchError:
            raise
        except (ValueError, TypeError):  # what urllib/httpcore raise for a URL they cannot parse
            raise FetchError("malformed image URL") from None

    async def _fetch(self, url: str, cap: int) -> bytes:
        url = ascii_url(url)
        scheme = _scheme(url)
        for _hop in range(MAX_REDIRECTS + 1):
            headers = [(b"User-Agent", USER_AGENT.encode()), (b"Accept", b"image/*")]
            async with self.pool.stream("GET", url, headers=headers) as resp:
                if resp.status in (301, 302, 303, 307, 308):
                    location = dict((k.lower(), v) for k, v in resp.headers).get(b"location")
                    if not location:
                        raise FetchError(f"image URL answered {resp.status} without a Location")
                    url = ascii_url(urljoin(url, location.decode("latin-1")))
                    if _scheme(url) != scheme:
                        raise FetchError("image URL redirects to another scheme: refused")
                    continue
                if resp.status != 200:
                    raise FetchError(f"image URL answered HTTP {resp.status}")
                return await self._read(resp, cap)
        raise FetchError(f"image URL redirects more than {MAX_REDIRECTS} times")

    async def _read(self, resp: httpcore.Response, cap: int) -> bytes:
        length = dict((k.lower(), v) for k, v in resp.headers).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise FetchError(f"image at URL is {int(length)} bytes, more than the limit of {cap}")
        parts, total = [], 0
        async for chunk in resp.aiter_stream():
            total += len(chunk)
            if total > cap:
                raise FetchError(f"image at URL is more than the limit of {cap} bytes")
            parts.append(chunk)
        return b"".join(parts)


def ascii_url(url: str) -> str:
    """The URL as httpcore sends it: an IDNA host and a percent-encoded path and query, or FetchError."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when it is not a number in 0-65535
        host = parts.hostname or ""
        if not url.isascii():
            host = host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        raise FetchError("malformed image URL (host or port)") from None
    if url.isascii():
        return url
    host = f"[{host}]" if ":" in host else host
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (quote(userinfo, safe=":%") + "@" if userinfo else "") + host + (f":{port}" if port is not None else "")
    safe = "/%:@!$&'()*+,;=-._~"
    return urlunsplit((parts.scheme, netloc, quote(parts.path, safe=safe), quote(parts.query, safe=safe + "?"), ""))


def _scheme(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("image URLs must be http:// or https://")
    return scheme
