"""The remote-media address filter, tested on resolved addresses without any connection."""

import socket

import httpx
import pytest

from nanovl.serve import protocol
from nanovl.serve.protocol import APIError, fetch_remote, public_addresses


def fake_dns(monkeypatch, table):
    """Names in `table` resolve to its addresses; loopback literals resolve as usual (the test server);
    every other name fails, so no DNS query ever leaves the machine."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host in ("127.0.0.1", "localhost", "::1"):
            return real(host, *args, **kwargs)
        if host not in table:
            raise socket.gaierror(f"unknown host {host}")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in table[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "0.0.0.0", "::1", "fd00::1"]
)
def test_private_addresses_are_refused(monkeypatch, address):
    fake_dns(monkeypatch, {"images.example": [address]})
    with pytest.raises(APIError, match="non-public address"):
        public_addresses("images.example")


def test_one_private_address_among_public_ones_is_refused(monkeypatch):
    fake_dns(monkeypatch, {"mixed.example": ["93.184.216.34", "10.0.0.1"]})
    with pytest.raises(APIError, match="10.0.0.1"):
        public_addresses("mixed.example")


def test_public_fetch_and_redirect_to_private(monkeypatch):
    fake_dns(monkeypatch, {"cdn.example": ["93.184.216.34"], "inner.example": ["192.168.0.5"]})
    seen = []

    def handler(request):  # an in-process transport: nothing leaves this process
        seen.append((request.url.host, request.headers["host"], request.extensions.get("sni_hostname")))
        if request.url.path == "/hop":
            return httpx.Response(302, headers={"location": "http://inner.example/secret.png"})
        return httpx.Response(200, content=b"\x89PNG fake")

    transport = httpx.MockTransport(handler)
    assert fetch_remote("https://cdn.example/page.png", transport=transport) == b"\x89PNG fake"
    with pytest.raises(APIError, match="inner.example resolves to 192.168.0.5"):
        fetch_remote("https://cdn.example/hop", transport=transport)
    # the connection goes to the checked address, the host name stays in Host and SNI; the private
    # host was never asked
    assert seen == [("93.184.216.34", "cdn.example", "cdn.example")] * 2
    with pytest.raises(APIError, match="cannot resolve"):
        fetch_remote("https://nowhere.example/x.png", transport=transport)


def test_size_cap(monkeypatch):
    fake_dns(monkeypatch, {"big.example": ["93.184.216.34"]})
    monkeypatch.setattr(protocol, "MAX_REMOTE_BYTES", 10)
    transport = httpx.MockTransport(lambda r: httpx.Response(200, content=b"x" * 100))
    with pytest.raises(APIError, match="more than"):
        fetch_remote("http://big.example/a.png", transport=transport)


@pytest.mark.parametrize(
    "address",
    [
        "100.64.0.1",  # shared address space (CGNAT)
        "100.100.100.200",  # a cloud metadata address inside it
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, its client 10.0.0.1
        "224.0.0.1",
        "ff02::1",
    ],
)
def test_shared_and_tunnelled_addresses_are_refused(monkeypatch, address):
    fake_dns(monkeypatch, {"images.example": [address]})
    with pytest.raises(APIError, match="non-public address"):
        public_addresses("images.example")


def test_the_checked_address_is_the_one_connected_to(monkeypatch):
    """DNS rebinding: a name that answers with a public address when checked and loopback after
    must still be fetched from the public one (one lookup per hop, and the connection pinned)."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"], ["127.0.0.1"]])
    real = socket.getaddrinfo

    def rebinding(host, *args, **kwargs):
        if host == "rebind.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in next(answers)]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    connected = []
    transport = httpx.MockTransport(lambda r: connected.append(r.url.host) or httpx.Response(200, content=b"ok"))
    assert fetch_remote("http://rebind.example/a.png", transport=transport) == b"ok"
    assert connected == ["93.184.216.34"]
