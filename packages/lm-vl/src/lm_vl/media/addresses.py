"""Which IP addresses a media URL may reach, and resolving a host once to the address that will be dialed."""

from __future__ import annotations

import ipaddress
import re
import socket

from lm_vl.media.errors import fetch_failed, refused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges refused by name, checked before `is_global` so the error says why. `ipaddress.is_global` alone is not
# enough: depending on the Python version it calls CGNAT, 6to4, NAT64 or Teredo addresses global, and those either
# reach a provider's internal network or wrap an IPv4 address that a gateway will dial for us.
_BLOCKED_NETWORKS: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible"),
    ("64:ff9b::/96", "NAT64"),
    ("64:ff9b:1::/48", "NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)
_NETWORKS = tuple((ipaddress.ip_network(cidr), label) for cidr, label in _BLOCKED_NETWORKS)
_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
# A host made only of numeric labels (decimal, octal `0177`, hex `0x7f`) is an IPv4 address in one of the legacy
# inet_aton forms: `2130706433`, `127.1`, `0x7f.0.0.1` all mean 127.0.0.1 to a resolver and to browsers.
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?")


def canonical_address(address: IPAddress) -> IPAddress:
    """The address with an IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) unwrapped to the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def blocked_reason(address: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why `address` may not be fetched from (e.g. "loopback"), or None for a public unicast address.

    `allow_loopback` admits 127.0.0.0/8 and ::1 only (a test server); every other non-public range stays refused.
    """
    address = canonical_address(address)
    if allow_loopback and any(address in network for network in _LOOPBACK):
        return None
    for network, label in _NETWORKS:
        if address.version == network.version and address in network:
            return label
    if not address.is_global:
        return "not globally routable"
    return None


def is_loopback_name(host: str) -> bool:
    """`localhost` and its subdomains (RFC 6761), which resolvers answer with loopback without asking DNS."""
    return host == "localhost" or host.endswith(".localhost")


def resolve_host(host: str, port: int, *, allow_loopback: bool = False) -> IPAddress:
    """The address to dial for `host` (normalized: lower case, no brackets, no trailing dot), validated.

    An IP literal or legacy numeric form is decoded without DNS; a name is resolved once with `socket.getaddrinfo`,
    and if ANY answer is refused the host is refused (a resolver that mixes public and private answers is steering
    us). The first answer is returned: the caller must connect to exactly that address and never resolve again, so
    a rebinding resolver cannot swap in another one between the check and the connection.
    """
    if is_loopback_name(host) and not allow_loopback:
        raise refused(f"host {host!r} names this machine (loopback)", "blocked_address")
    literal = _literal_address(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise fetch_failed(f"could not resolve host {host!r}: {exc}", "dns_failure") from None
        # sockaddr[0] of an IPv6 answer may carry a zone (`fe80::1%eth0`), which ip_address accepts.
        addresses = [ipaddress.ip_address(str(sockaddr[0])) for *_, sockaddr in answers]
        if not addresses:
            raise fetch_failed(f"host {host!r} has no addresses", "dns_failure")
    for address in addresses:
        reason = blocked_reason(address, allow_loopback=allow_loopback)
        if reason is not None:
            shown = canonical_address(address)
            named = f"host {host!r}" if str(shown) == host else f"host {host!r} resolves to {shown}, which"
            raise refused(f"{named} is not a public address ({reason})", "blocked_address")
    return canonical_address(addresses[0])


def _literal_address(host: str) -> IPAddress | None:
    if "%" in host:  # a zone id (`fe80::1%25eth0`) names an interface, which a remote URL has no business choosing
        raise refused(f"host {host!r} carries an IPv6 zone id", "blocked_address")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
        except OSError:
            raise refused(f"host {host!r} is not a valid IPv4 address", "invalid_url") from None
    return None
