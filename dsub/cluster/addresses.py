"""Checks of the network settings a cluster starts with, made before any long work.

Dask reports a network interface this machine lacks, or a dashboard address it
cannot listen on, only as the cluster starts (``RuntimeError: Cluster failed to
start``), after the input checks; these checks refuse them at once, in one line.
"""

from __future__ import annotations

import socket

from ..errors import OptionError


def interface_names() -> list[str]:
    """The network interfaces of this machine (``psutil.net_if_addrs``, which Dask's ``--interface`` reads)."""
    import psutil

    return list(psutil.net_if_addrs())


def check_interface(name: str, where: str = "--interface") -> None:
    """Raise ``OptionError`` unless ``name`` is a network interface of this machine."""
    names = interface_names()
    if name not in names:
        raise OptionError(f"{where} {name}: no such network interface on this machine (it has "
                          f"{', '.join(names) or 'none'}). Give one of those (on a cluster, its internal network, e.g. ib0).")


def check_dashboard_address(text: str) -> None:
    """Raise ``OptionError`` unless ``text`` is where a dashboard can listen: ``HOST:PORT``, ``:PORT`` or ``PORT``.

    Several, separated by commas, as Dask's ``clean_dashboard_address`` reads
    them; HOST must resolve on this machine and PORT be 0 to 65535 (0: any free one).
    """
    form = ("give HOST:PORT (e.g. 127.0.0.1:8787, this machine only), :PORT (every interface) or PORT; "
            "0 as PORT takes any free one")
    for part in str(text).split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon and not port.strip().isdigit():
            raise OptionError(f"--dashboard-address {text}: {form}")
        if not port.strip().isdigit():
            raise OptionError(f"--dashboard-address {text}: the port {port!r} is not a number; {form}")
        if not 0 <= int(port) <= 65535:
            raise OptionError(f"--dashboard-address {text}: the port {int(port)} is beyond 0-65535; {form}")
        if ":" in host:
            raise OptionError(f"--dashboard-address {text}: {form}")
        if host:
            try:
                socket.getaddrinfo(host, None)
            except (OSError, UnicodeError) as exc:
                raise OptionError(f"--dashboard-address {text}: this machine cannot resolve the host {host} "
                                  f"({exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}); "
                                  f"{form}") from None
