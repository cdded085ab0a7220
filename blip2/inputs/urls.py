"""Image URLs fetched safely: http(s) only, a total deadline, a size limit, redirects followed and
checked hop by hop, and, for a server that takes URLs from untrusted clients, no private addresses
(a URL must not reach the server's own network: cloud metadata, databases, admin pages)."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

from .errors import ImageError

_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class UrlPolicy:
    """Which image URLs are fetched, and how much of them. The default fetches any http(s) URL, as a
    library user expects; a server that takes URLs from untrusted clients passes allow_private=False."""

    allow_private: bool = True  # False: refuse private, loopback, link-local, multicast and reserved addresses
    allowed_local_path: Path | None = None  # file:// URLs are read under this directory only; None: never
    timeout: float = 30.0  # seconds in all: resolving, connecting, redirects, headers and body
    max_bytes: int = 50_000_000
    max_redirects: int = 5


def fetch(url: str, policy: UrlPolicy) -> bytes:
    """The body of `url`, as `policy` allows; an ImageError naming the URL and the problem otherwise.

    The download runs on a thread of its own, which this one waits for: a server that trickles a
    byte at a time, or sends headers forever, cannot hold the caller (or Ctrl-C) past the deadline;
    the thread notices and stops at its next read."""
    if url[:5].lower() == "file:":
        return _read_local(url, policy)
    done = threading.Event()
    result: list = []

    def download() -> None:
        try:
            result.append(_download(url, policy, done))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            result.append(e)
        finally:
            done.set()

    threading.Thread(target=download, daemon=True, name="blip2-fetch").start()
    if not done.wait(policy.timeout):
        done.set()  # tells the download to stop
        raise ImageError(f"cannot fetch image {url!r}: no complete answer within timeout={policy.timeout:g} s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def check_address(host: str, policy: UrlPolicy, name: str | None = None) -> tuple[str, ...]:
    """The addresses `host` resolves to (numeric forms such as 2130706433 or 0x7f.1 included), all
    of them allowed by `policy`: one private address refuses the host. name: how errors name the URL.
    Raises ImageError for a refused address, socket.gaierror for a name that does not resolve."""
    name = name or f"host {host!r}"
    addresses = tuple(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)))
    if not policy.allow_private:
        for address in addresses:
            kind = _private_kind(ipaddress.ip_address(address))
            if kind is not None:
                raise ImageError(f"{name} points to a {kind} address ({address}); such addresses are not fetched")
    return addresses


def _private_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Which kind of non-public address `ip` is, or None for a public one. An IPv6 address that
    carries an IPv4 one (::ffff:127.0.0.1, 6to4) is judged by the IPv4 address."""
    embedded = (ip.ipv4_mapped or ip.sixtofour) if ip.version == 6 else None
    if embedded is not None:
        return _private_kind(embedded)
    kinds = {"loopback": ip.is_loopback, "link-local": ip.is_link_local, "multicast": ip.is_multicast,
             "unspecified": ip.is_unspecified, "reserved": ip.is_reserved, "private": ip.is_private}
    return next((kind for kind, found in kinds.items() if found), None if ip.is_global else "non-public")


class _Pinned(http.client.HTTPConnection):
    """HTTP to addresses checked beforehand: connect() does not resolve the host name again, which
    could answer a private address the second time (DNS rebinding). The Host header names the host."""

    def __init__(self, host: str, port: int, addresses: tuple[str, ...], timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.addresses = addresses

    def connect(self) -> None:
        error = None
        for address in self.addresses:  # in turn, as socket.create_connection tries a name's addresses
            try:
                self.sock = socket.create_connection((address, self.port), self.timeout)
                return
            except OSError as e:
                error = e
        raise error


class _PinnedTLS(_Pinned):
    """HTTPS likewise: the host name goes in SNI and the certificate is checked against it."""

    default_port = 443

    def connect(self) -> None:
        super().connect()
        self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=self.host)


def _download(url: str, policy: UrlPolicy, cancelled: threading.Event) -> bytes:
    deadline = time.monotonic() + policy.timeout
    hop = url
    for _ in range(policy.max_redirects + 1):
        name = repr(url) if hop == url else f"{url!r} (redirected to {hop!r})"
        try:
            # never a timeout of 0, which makes a socket non-blocking; past the deadline, no one waits anyway
            connection, target = _connection(hop, name, policy, max(deadline - time.monotonic(), 0.01))
            try:
                connection.request("GET", target, headers={"User-Agent": "blip2"})
                response = connection.getresponse()
                location = response.getheader("Location")
                if response.status in _REDIRECTS and location:
                    hop = urljoin(hop, location)
                    continue
                if not 200 <= response.status < 300:
                    raise ImageError(f"image URL {name} answered {response.status} {response.reason}")
                return _body(response, name, policy.max_bytes, cancelled)
            finally:
                connection.close()
        except ImageError:
            raise
        except (OSError, ValueError, http.client.HTTPException) as e:  # refused, reset, TLS, a malformed URL
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ImageError(f"cannot fetch image {name}: {reason}") from None
    raise ImageError(f"image URL {url!r} redirected more than {policy.max_redirects} times")


def _connection(url: str, name: str, policy: UrlPolicy, timeout: float) -> tuple[_Pinned, str]:
    """An unopened connection to `url`'s host, its scheme and addresses checked, and the path to ask for."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"image URL scheme {scheme!r} is not supported (http or https): {name}")
    if not parts.hostname:
        raise ImageError(f"image URL {name} names no host")
    addresses = check_address(parts.hostname, policy, f"image URL {name}")
    pinned = _PinnedTLS if scheme == "https" else _Pinned
    connection = pinned(parts.hostname, parts.port or pinned.default_port, addresses, timeout)
    return connection, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _body(response: http.client.HTTPResponse, name: str, max_bytes: int, cancelled: threading.Event) -> bytes:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"image URL {name} is {int(declared)} bytes, more than max_bytes={max_bytes}")
    data = bytearray()
    while len(data) <= max_bytes and not cancelled.is_set():
        chunk = response.read1(min(1 << 16, max_bytes + 1 - len(data)))
        if not chunk:
            break
        data += chunk
    if len(data) > max_bytes:
        raise ImageError(f"image URL {name} sent more than max_bytes={max_bytes} bytes")
    return bytes(data)


def _read_local(url: str, policy: UrlPolicy) -> bytes:
    """A file:// URL's file, read only when it lies under policy.allowed_local_path once `..` and
    every symlink are resolved."""
    if policy.allowed_local_path is None:
        raise ImageError(f"image URL scheme 'file' is not supported (http or https): {url!r}")
    root = Path(policy.allowed_local_path).resolve()
    try:
        parts = urlsplit(url)
        path = Path(url2pathname(parts.path)).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: a symlink loop, before Python 3.13
        raise ImageError(f"cannot read local file {url!r}: {e}") from None
    if parts.netloc not in ("", "localhost"):
        raise ImageError(f"local file {url!r} names another host ({parts.netloc}); only this one's files are read")
    if not path.is_relative_to(root):
        raise ImageError(f"local file {url!r} is outside the allowed media directory {str(root)!r}")
    if not path.is_file():
        raise ImageError(f"local file {url!r} not found")
    try:
        with path.open("rb") as file:
            data = file.read(policy.max_bytes + 1)
    except OSError as e:
        raise ImageError(f"cannot read local file {url!r}: {e.strerror}") from None
    if len(data) > policy.max_bytes:
        raise ImageError(f"local file {url!r} is more than max_bytes={policy.max_bytes} bytes")
    return data
