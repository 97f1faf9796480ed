"""Requests the service makes to a URL a user gave it (a data set's https:// source, a webhook
endpoint) must not reach the service's own network (server-side request forgery).

Two checks, one rule (every address must be global unicast):
- at creation, in the API, without resolving anything (the API's host may have no DNS, and a
  name resolves differently later anyway): `private_host` refuses `localhost` and literal
  addresses that are loopback, private, link-local or reserved;
- at request time, on the worker: `checked_address` resolves the host, refuses it if *any* of
  its addresses is not global, and returns the address to connect to, so no second lookup (a
  rebinding DNS) can answer differently; `pinned_request` builds the request to that address
  with the original name in Host and in TLS (SNI, certificate check).
"""

from __future__ import annotations

import ipaddress
import socket

import httpx


class AddressRefused(ValueError):
    """The host resolves to an address the service may not connect to."""


class HostUnresolved(AddressRefused):
    """The host does not resolve (to any address)."""


def refused_address(address: str) -> str | None:
    """Why `address` may not be connected to (it is not a global unicast address), or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone: fe80::1%eth0
    embedded: list[ipaddress.IPv4Address] = []
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4 carried in IPv6 (mapped, 6to4, Teredo's client, NAT64) reaches that IPv4 address.
        embedded = [a for a in (ip.ipv4_mapped, ip.sixtofour, ip.teredo and ip.teredo[1]) if a]
        if ip in ipaddress.ip_network("64:ff9b::/96"):
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for candidate in (*embedded, ip):
        for kind in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
            if getattr(candidate, f"is_{kind}"):
                return f"{kind.replace('_', '-')} address {candidate}"
        if not candidate.is_global:
            return f"non-global address {candidate}"
    return None


def private_host(host: str) -> bool:
    """`localhost`, or a literal IP address (also IPv4's short forms, 127.1, 0x7f.1) that is not
    global. Names are not resolved here: the request-time check resolves them."""
    host = host.lower().rstrip(".").removeprefix("[").removesuffix("]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.ip_address(socket.inet_aton(host))  # 127.1, 2130706433, 0x7f000001
        except OSError:
            return False
    return refused_address(str(address)) is not None


def checked_address(host: str, port: int, allow_private: bool, setting: str) -> str:
    """The address to connect to: the host's first, once every address it resolves to passed.
    AddressRefused (naming `setting`, which lifts the check) otherwise."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise HostUnresolved(f"cannot resolve {host}: {exc}") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise HostUnresolved(f"cannot resolve {host}: no address")
    if not allow_private:
        for address in addresses:
            if (why := refused_address(address)) is not None:
                raise AddressRefused(f"it resolves to a {why}, not a public one ({setting} allows it)")
    return addresses[0]


def pinned_request(client: httpx.Client, method: str, url: httpx.URL, address: str, **kwargs: object) -> httpx.Request:
    """A request to `url` sent to `address` (from checked_address): the server sees the original
    name in Host and in TLS (SNI), and the certificate is verified against that name."""
    host = url.raw_host.decode("ascii")  # IDNA-encoded, as DNS and TLS know it
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    headers = {"Host": url.netloc.decode("ascii"), **dict(kwargs.pop("headers", None) or {})}  # type: ignore[call-overload]
    return client.build_request(
        method,
        url.copy_with(host=address),
        headers=headers,
        extensions=extensions,
        **kwargs,  # type: ignore[arg-type]
    )
