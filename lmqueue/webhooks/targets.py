"""Which URLs a webhook may target. A server that POSTs wherever a tenant asks could be made
to reach the operator's internal network (SSRF): loopback, private, link-local and other
non-public addresses are refused unless `webhook_allow_private_targets` is set. Checked when an
endpoint is created and again before every attempt (a name may resolve elsewhere later)."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class BadTarget(ValueError):
    pass


def _non_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def check_url(url: str) -> tuple[str, int]:
    """An absolute http(s) URL with a host; returns (host, port)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadTarget(f"url: not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadTarget("url: must be an absolute http:// or https:// URL")
    if parts.username or parts.password:
        raise BadTarget("url: must not carry credentials")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def check_target(url: str, allow_private: bool) -> None:
    """Raise BadTarget when `url` is malformed, does not resolve, or (unless allowed) reaches
    a non-public address."""
    host, port = check_url(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as exc:
        raise BadTarget(f"url: cannot resolve {host!r}") from exc
    if allow_private:
        return
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if _non_public(ip):
            raise BadTarget(
                f"url: {host!r} resolves to {ip}, a private, loopback or link-local address; "
                "such targets are refused on this server"
            )
