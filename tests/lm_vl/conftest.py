"""Fixtures of the media tests: the loopback media server (one per run) and a fake resolver (one per test)."""

from __future__ import annotations

import importlib
import socket
from collections.abc import Iterator

import pytest

h = importlib.import_module("tests.lm_vl.media_helpers")


@pytest.fixture(scope="session")
def media_server() -> Iterator:
    """`media_helpers.MediaServer` on 127.0.0.1, stopped at the end of the run."""
    server, stop = h.start_media_server()
    yield server
    stop()


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> object:
    """A `FakeDNS` installed as `socket.getaddrinfo` for one test."""
    dns = h.FakeDNS(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    return dns
