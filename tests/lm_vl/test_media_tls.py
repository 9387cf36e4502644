"""HTTPS through the pinned transport: the socket goes to the validated address, TLS still speaks to the host name.

A self-signed certificate for `media.test` (made with the openssl command line; skipped without it) is served on
127.0.0.1, the fake resolver maps `media.test` there, and the client trusts only that certificate. Success shows the
SNI and the certificate check used the name (the certificate names no IP address); a certificate for another name
shows verification is on.
"""

from __future__ import annotations

import importlib
import shutil
import ssl
import subprocess

import pytest

from lm_vl.media import MediaError, decode_image
from lm_vl.media.fetch import fetch_url

h = importlib.import_module("tests.lm_vl.media_helpers")
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")


def _certificate(directory, name: str) -> tuple[str, str]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    key_options = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key)]
    subject = ["-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"]
    command = ["openssl", "req", "-x509", *key_options, "-out", str(cert), "-days", "2", *subject]
    subprocess.run(command, check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS media server presenting a certificate for `media.test`; yields (server, cert path, SNI names seen)."""
    cert, key = _certificate(tmp_path_factory.mktemp("tls"), "media.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server_names: list[str | None] = []
    context.sni_callback = lambda _socket, name, _context: server_names.append(name)
    server, stop = h.start_media_server(ssl_context=context)
    yield server, cert, server_names
    stop()


def _client_context(cafile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    # Python 3.13+ is strict about CA extensions a one-line self-signed certificate lacks; not what is tested here.
    context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    return context


def test_https_dials_the_pinned_address_with_the_host_name_for_sni_and_certificate(tls_server, fake_dns):
    server, cert, server_names = tls_server
    fake_dns.add("media.test", ["127.0.0.1"], ["10.255.255.1"])
    url = f"https://media.test:{server.port}/image.png"
    data = fetch_url(url, h.LOOPBACK_POLICY, ssl_context=_client_context(cert))
    assert decode_image(data, h.LOOPBACK_POLICY).size == (32, 24)
    assert server_names[-1] == "media.test"
    assert server.requests[-1] == ("/image.png", f"media.test:{server.port}")
    assert fake_dns.lookups == ["media.test"]


def test_https_certificate_for_another_name_is_refused(tls_server, fake_dns, tmp_path):
    server, _, _ = tls_server
    other_cert, _ = _certificate(tmp_path, "other.test")
    fake_dns.add("media.test", ["127.0.0.1"])
    with pytest.raises(MediaError) as caught:
        fetch_url(
            f"https://media.test:{server.port}/image.png", h.LOOPBACK_POLICY, ssl_context=_client_context(other_cert)
        )
    assert (caught.value.status_code, caught.value.code) == (422, "fetch_failed")
    assert "CERTIFICATE_VERIFY_FAILED" in caught.value.message


def test_https_to_an_ip_literal_checks_the_certificate_against_the_ip(tls_server):
    server, cert, _ = tls_server
    with pytest.raises(MediaError) as caught:
        fetch_url(f"https://127.0.0.1:{server.port}/image.png", h.LOOPBACK_POLICY, ssl_context=_client_context(cert))
    assert caught.value.status_code == 422
