"""Image URLs fetched safely (blip2.inputs.urls), against real servers on 127.0.0.1: schemes,
private addresses, redirects checked hop by hop, size limits, the deadline, file:// URLs and TLS."""

from __future__ import annotations

import datetime
import http.server
import io
import ssl
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip2.inputs import urls
from blip2.inputs.images import ImageError, load_image
from blip2.inputs.urls import UrlPolicy, check_address, fetch

SERVER = UrlPolicy(allow_private=False)  # what a server facing untrusted clients passes


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        redirects = {"/loop": "/loop", "/to-private": "http://10.0.0.1/a.jpg", "/to-ftp": "ftp://example.com/a.png",
                     "/to-file": "file:///etc/passwd",
                     "/to-local": f"http://localhost:{self.server.server_port}/img.png"}
        try:
            if self.path == "/img.png":
                self._send(PNG)
            elif self.path == "/host":
                self._send(self.headers["Host"].encode())
            elif self.path.startswith("/hops/"):  # /hops/n: n redirects, then the image
                n = int(self.path.rsplit("/", 1)[1])
                self._redirect("/img.png" if n == 1 else f"/hops/{n - 1}")
            elif self.path in redirects:
                self._redirect(redirects[self.path])
            elif self.path == "/big":
                self._send(b"\0" * 5000)
            elif self.path == "/big-stream":  # no Content-Length: only the read cap can stop it
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\0" * 5000)
            elif self.path == "/trickle":  # a byte every 0.05 s of a body it says is 10 kB
                self.send_response(200)
                self.send_header("Content-Length", "10000")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self.send_error(404)
        except OSError:  # the client gave up, as it should
            pass

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _serve(tls: ssl.SSLContext | None = None):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def port():
    server = _serve()
    yield server.server_port
    server.shutdown()
    server.server_close()


def _refused(url: str, policy: UrlPolicy, *needles: str) -> str:
    with pytest.raises(ImageError) as info:
        fetch(url, policy)
    message = str(info.value)
    assert all(n in message for n in needles) and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------
# addresses

@pytest.mark.parametrize("host, kind", [
    ("127.0.0.1", "loopback"), ("localhost", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
    ("169.254.169.254", "link-local"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("2130706433", "loopback"), ("0x7f.1", "loopback"), ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"), ("100.64.0.1", "non-public"), ("fc00::1", "private"), ("fe80::1", "link-local"),
    ("2002:7f00:1::1", "loopback"),
])
def test_check_address_refuses_private_addresses(host: str, kind: str) -> None:
    with pytest.raises(ImageError, match=f"points to a {kind} address"):
        check_address(host, SERVER)
    assert check_address(host, UrlPolicy(allow_private=True))


@pytest.mark.parametrize("host", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_check_address_passes_public_addresses(host: str) -> None:
    assert check_address(host, SERVER)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.0.0.1", "169.254.169.254", "[::1]",
                                  "[::ffff:127.0.0.1]", "2130706433", "0x7f.1"])
def test_server_policy_refuses_private_urls_before_connecting(port: int, host: str) -> None:
    url = f"http://{host}:{port}/img.png"
    start = time.monotonic()
    _refused(url, SERVER, repr(url), "address", "not fetched")
    assert time.monotonic() - start < 1.0


def test_private_urls_are_fetched_when_allowed(port: int) -> None:
    assert fetch(f"http://127.0.0.1:{port}/img.png", UrlPolicy()) == PNG
    assert fetch(f"http://2130706433:{port}/img.png", UrlPolicy()) == PNG
    image = load_image(f"http://localhost:{port}/img.png", policy=UrlPolicy())
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(PNG))))


def test_the_checked_address_is_used_and_the_host_header_names_the_host(port: int) -> None:
    assert fetch(f"http://localhost:{port}/host", UrlPolicy()) == f"localhost:{port}".encode()


# ----------------------------------------------------------------------------------------------
# schemes, statuses, redirects

@pytest.mark.parametrize("url, scheme", [
    ("ftp://example.com/a.png", "ftp"), ("file:///etc/passwd", "file"), ("gopher://example.com/", "gopher"),
    ("data:image/png;base64,iVBORw0KGgo=", "data"), ("/etc/passwd", ""),
])
def test_other_schemes_are_refused(url: str, scheme: str) -> None:
    _refused(url, UrlPolicy(), f"scheme {scheme!r} is not supported", repr(url))


def test_a_policy_makes_every_string_a_url(tmp_path: Path) -> None:
    (tmp_path / "img.png").write_bytes(PNG)
    assert load_image(str(tmp_path / "img.png")).size == (8, 6)
    with pytest.raises(ImageError, match="scheme '' is not supported"):
        load_image(str(tmp_path / "img.png"), policy=UrlPolicy())


def test_status_errors_name_the_url(port: int) -> None:
    _refused(f"http://127.0.0.1:{port}/missing.png", UrlPolicy(), "missing.png", "answered 404 Not Found")


def test_redirects_are_followed_up_to_the_limit(port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    assert fetch(f"{base}/hops/5", UrlPolicy()) == PNG
    _refused(f"{base}/hops/6", UrlPolicy(), "/hops/6'", "redirected more than 5 times")
    _refused(f"{base}/hops/1", UrlPolicy(max_redirects=0), "redirected more than 0 times")
    _refused(f"{base}/loop", UrlPolicy(max_redirects=20), "redirected more than 20 times")


def test_every_redirect_is_checked_again(port: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    checked = []

    def first_hop_public(host: str, policy: UrlPolicy, name: str | None = None) -> tuple[str, ...]:
        """The real check, on every hop; 127.0.0.1, the first hop, passes as a public host would."""
        checked.append(host)
        return check_address(host, UrlPolicy() if host == "127.0.0.1" else policy, name)

    monkeypatch.setattr(urls, "check_address", first_hop_public)
    base = f"http://127.0.0.1:{port}"
    _refused(f"{base}/to-private", SERVER, "redirected to 'http://10.0.0.1/a.jpg'", "private address (10.0.0.1)")
    _refused(f"{base}/to-local", SERVER, f"redirected to 'http://localhost:{port}/img.png'", "loopback address")
    assert checked == ["127.0.0.1", "10.0.0.1", "127.0.0.1", "localhost"]
    _refused(f"{base}/to-ftp", UrlPolicy(), "scheme 'ftp' is not supported")
    _refused(f"{base}/to-file", UrlPolicy(allowed_local_path=Path("/")), "scheme 'file' is not supported")


# ----------------------------------------------------------------------------------------------
# size and time

def test_size_limit_with_and_without_content_length(port: int) -> None:
    policy = UrlPolicy(max_bytes=1000)
    _refused(f"http://127.0.0.1:{port}/big", policy, "/big'", "is 5000 bytes, more than max_bytes=1000")
    _refused(f"http://127.0.0.1:{port}/big-stream", policy, "/big-stream'", "sent more than max_bytes=1000")
    assert len(fetch(f"http://127.0.0.1:{port}/big", UrlPolicy(max_bytes=5000))) == 5000


def test_a_trickling_server_cannot_hold_the_caller_past_the_deadline(port: int) -> None:
    start = time.monotonic()
    _refused(f"http://127.0.0.1:{port}/trickle", UrlPolicy(timeout=0.5), "/trickle", "within timeout=0.5 s")
    assert time.monotonic() - start < 1.5


# ----------------------------------------------------------------------------------------------
# file:// URLs

def test_local_files_only_under_the_allowed_directory(tmp_path: Path) -> None:
    media, outside = tmp_path / "media", tmp_path / "secret.png"
    media.mkdir()
    (media / "img.png").write_bytes(PNG)
    outside.write_bytes(PNG)
    (media / "link.png").symlink_to(outside)
    policy = UrlPolicy(allowed_local_path=media)
    assert fetch(f"file://{media}/img.png", policy) == PNG
    assert fetch(f"file://localhost{media}/img.png", policy) == PNG
    for url in (f"file://{outside}", f"file://{media}/../secret.png", f"file://{media}/link.png"):
        _refused(url, policy, repr(url), "outside the allowed media directory")
    _refused(f"file://{media}/none.png", policy, "not found")
    _refused(f"file://elsewhere{media}/img.png", policy, "names another host")
    _refused(f"file://{media}/img.png", UrlPolicy(allowed_local_path=media, max_bytes=10), "max_bytes=10")
    assert np.array_equal(np.asarray(load_image(f"file://{media}/img.png", policy=policy)),
                          np.asarray(Image.open(io.BytesIO(PNG))))


# ----------------------------------------------------------------------------------------------
# TLS: the certificate is checked against the host name, though the connection goes to the checked address

def test_https_checks_the_certificate_against_the_host_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cryptography")
    ca, cert, key = _certificates(tmp_path, "localhost")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = _serve(tls)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # read by ssl.create_default_context
    port = server.server_port
    try:
        assert fetch(f"https://localhost:{port}/img.png", UrlPolicy()) == PNG
        assert fetch(f"https://localhost:{port}/host", UrlPolicy()) == f"localhost:{port}".encode()
        _refused(f"https://127.0.0.1:{port}/img.png", UrlPolicy(), "CERTIFICATE_VERIFY_FAILED")
    finally:
        server.shutdown()
        server.server_close()


def _certificates(directory: Path, host: str) -> tuple[Path, Path, Path]:
    """A certificate authority, and a certificate it signed for `host` (not for 127.0.0.1), with its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    hour = datetime.timedelta(hours=1)

    def certificate(subject: str, key, issuer: str, signer, ca: bool, extensions=()):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - hour).not_valid_after(now + hour)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        for extension in (x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                          x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), *extensions):
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    usage = dict(content_commitment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                 decipher_only=False, crl_sign=True)
    ca = certificate("test CA", ca_key, "test CA", ca_key, True,
                     [x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=True, **usage)])
    leaf = certificate(host, key, "test CA", ca_key, False,
                       [x509.SubjectAlternativeName([x509.DNSName(host)]),
                        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH])])
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths
