"""Fetching image URLs for the router, behind an address policy and limits.

A client's URL makes the router connect somewhere, so every hop is checked before any
connection: the scheme (http, https), the host against `allowed_media_domains`, and every
address the host resolves to against the address policy (`MediaConfig` in `shared/settings.py`
says what is refused and how operators open it). The connection then goes to the checked
address itself, never through a second DNS lookup, so a name cannot resolve to one address for
the check and another for the connection. Redirects are followed by hand, each one checked the
same way, up to `media_max_redirects`.

Names that cannot need DNS are answered locally (RFC 6761): `*.invalid` never resolves and
`localhost` is loopback. Limits: `media_connect_timeout` for the lookup and the connection,
`media_read_timeout` for the whole response (a stalled read waits at most that long again),
`max_image_bytes` for the body.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urljoin, urlsplit

from router.prompt import InvalidRequest
from shared.settings import MediaConfig

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[IPAddress]]

# Cloud instance metadata services (AWS, GCP and Azure IPv4; AWS IPv6).
METADATA_ADDRESSES = frozenset(map(ipaddress.ip_address, ("169.254.169.254", "fd00:ec2::254")))
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
LOOPBACK_ADDRESSES = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
READ_SIZE = 64 * 1024
MAX_FETCH_THREADS = 32


class MediaError(InvalidRequest):
    """An image input the router cannot use; the message names the problem and is safe to show
    the client (HTTP 400). `param` names the content part (`messages[0].content[1]`)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One checked hop: where to connect (`addresses`) and what to ask for."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[IPAddress, ...]


def system_resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (blocking; run it on a thread)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    return list(dict.fromkeys(found))


def address_kind(address: IPAddress) -> str | None:
    """Why `address` is not a public one ("loopback", "private", ...), or None when it is.

    An IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64) is judged by that one."""
    if isinstance(address, ipaddress.IPv6Address):
        address = _embedded_ipv4(address) or address
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    for kind in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "non-public"


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address in NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.ipv4_mapped or address.sixtofour


class UrlFetcher:
    def __init__(self, config: MediaConfig, resolve: Resolver = system_resolve) -> None:
        self.config = config
        self.resolve = resolve
        self.domains = tuple(d.strip(".").lower() for d in config.allowed_media_domains)
        # Lookups and downloads block a thread each, up to their timeouts; their own pool keeps
        # a burst of slow hosts from starving the event loop's default executor.
        self._threads = ThreadPoolExecutor(MAX_FETCH_THREADS, thread_name_prefix="media-fetch")

    async def fetch(self, url: str) -> bytes:
        """The body of `url` after checked redirects; raises `MediaError` naming the problem."""
        for _ in range(self.config.media_max_redirects + 1):
            target = await self.check(url)
            loop = asyncio.get_running_loop()
            status, location, body = await loop.run_in_executor(self._threads, self._get, target)
            if status not in REDIRECT_STATUSES:
                return body
            if not location:
                raise MediaError(f"image URL {target.host} answered HTTP {status} without Location")
            url = urljoin(url, location)
        raise MediaError(f"image URL redirected more than {self.config.media_max_redirects} times")

    async def check(self, url: str) -> Target:
        """The hop to `url` if the policy allows it; every refusal happens before any connection."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise MediaError(f"image URL scheme {scheme!r} is not supported; use data:, http: "
                             "or https:")  # fmt: skip
        host = _ascii_host(parts.hostname or "")
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError as exc:
            raise MediaError(f"image URL has an invalid port: {exc}") from exc
        addresses = self._local_answer(host)
        if addresses is not None:
            self._check_addresses(host, addresses)
        if self.domains and not self._listed(host):
            raise MediaError(f"image URL host {host} is not in this server's allowed_media_domains")
        if addresses is None:
            addresses = await self._lookup(host, port)
            self._check_addresses(host, addresses)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return Target(url, scheme, host, port, path, tuple(addresses))

    # ------------------------------------------------------------ policy

    def _local_answer(self, host: str) -> list[IPAddress] | None:
        """Addresses known without DNS (a literal, `localhost`); None when a lookup is needed."""
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        if host == "invalid" or host.endswith(".invalid"):
            raise MediaError(f"image URL host {host} does not resolve (.invalid never does)")
        if host == "localhost" or host.endswith(".localhost"):
            return list(LOOPBACK_ADDRESSES)
        return None

    def _listed(self, host: str) -> bool:
        return any(host == d or host.endswith(f".{d}") for d in self.domains)

    def _check_addresses(self, host: str, addresses: list[IPAddress]) -> None:
        if self.config.allow_private_media_urls:
            return
        for address in addresses:
            kind = address_kind(address)
            if kind is None or (kind != "cloud metadata" and self._listed(host)):
                continue
            shown = host if host == str(address) else f"{host} ({address})"
            raise MediaError(f"image URL host {shown} is a {kind} address; the server refuses "
                             "to fetch from it")  # fmt: skip

    async def _lookup(self, host: str, port: int) -> list[IPAddress]:
        timeout = self.config.media_connect_timeout
        try:
            lookup = asyncio.get_running_loop().run_in_executor(
                self._threads, self.resolve, host, port
            )
            found = await asyncio.wait_for(lookup, timeout)
        except asyncio.TimeoutError as exc:
            raise MediaError(f"image URL host {host} did not resolve within {timeout:g} s") from exc
        except OSError as exc:  # socket.gaierror and friends
            raise MediaError(f"image URL host {host} does not resolve: {exc}") from exc
        if not found:
            raise MediaError(f"image URL host {host} does not resolve")
        return found

    # ------------------------------------------------------------ one HTTP GET (on a thread)

    def _get(self, target: Target) -> tuple[int, str, bytes]:
        """(status, Location, body); the body is only read for a final (non-redirect) answer."""
        conn = _PinnedConnection(target, self.config.media_connect_timeout,
                                 self.config.media_read_timeout)  # fmt: skip
        try:
            conn.request(
                "GET", target.path, headers={"Accept": "image/*", "User-Agent": "kimiserve"}
            )
            response = conn.getresponse()
            if response.status in REDIRECT_STATUSES:
                return response.status, response.getheader("Location", ""), b""
            if response.status != 200:
                raise MediaError(f"image URL {target.url} answered HTTP {response.status}")
            kind = response.getheader("Content-Type", "")
            if kind.startswith("text/"):
                raise MediaError(f"image URL {target.url} returned {kind}, not an image")
            return response.status, "", self._read_body(target, response)
        except (OSError, http.client.HTTPException) as exc:
            raise MediaError(f"cannot fetch image URL {target.url}: {_describe(exc)}") from exc
        finally:
            conn.close()

    def _read_body(self, target: Target, response: http.client.HTTPResponse) -> bytes:
        limit = self.config.max_image_bytes
        too_large = MediaError(f"image at {target.url} is larger than {limit} bytes")
        declared = response.getheader("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        deadline = time.monotonic() + self.config.media_read_timeout
        body = bytearray()
        while piece := response.read1(READ_SIZE):
            body += piece
            if len(body) > limit:
                raise too_large
            if time.monotonic() > deadline:
                raise MediaError(f"image URL {target.url} took longer than "
                                 f"{self.config.media_read_timeout:g} s to send")  # fmt: skip
        return bytes(body)


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to the target's checked addresses, never to a fresh lookup of its name; the
    Host header and the TLS server name stay the URL's host."""

    def __init__(self, target: Target, connect_timeout: float, read_timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=connect_timeout)
        self.target = target
        self.read_timeout = read_timeout

    def connect(self) -> None:
        error: OSError | None = None
        for address in self.target.addresses:
            try:
                sock = socket.create_connection((str(address), self.port), self.timeout)
                break
            except OSError as exc:
                error = exc
        else:
            assert error is not None, "a target always has an address"
            raise error
        if self.target.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        sock.settimeout(self.read_timeout)  # each read; the body also has a total deadline
        self.sock = sock


def _ascii_host(host: str) -> str:
    host = host.rstrip(".").lower()
    if not host:
        raise MediaError("image URL has no host")
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise MediaError(f"image URL host {host!r} is not a valid name") from exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    return str(exc) or type(exc).__name__
