"""Help for tests that run a world: free ports and a private MX network, so worlds run side by side."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from config.settings import Settings, load_settings


def free_dns_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on host."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free UDP+TCP port")


def private_mx_network() -> tuple[str, int]:
    """A /24 in 127.0.0.0/8 no one else is likely to use, and a port free on its addresses."""
    rng = random.SystemRandom()
    for _ in range(100):
        network = f"127.{rng.randint(100, 250)}.{rng.randint(1, 250)}.0/24"
        base = network.rsplit(".", 1)[0]
        with socket.socket() as probe:
            probe.bind((f"{base}.1", 0))
            port = probe.getsockname()[1]
        if all(_free(f"{base}.{host}", port) for host in range(2, 8)):
            return network, port
    raise RuntimeError("no free MX network")


def _free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def world_settings(home: Path, **overrides: object) -> Settings:
    """Settings for a world of its own under home (and a relay pointed at it)."""
    network, port = private_mx_network()
    values: dict[str, object] = {
        "home": home,
        "sandbox_dns_listen": f"127.0.0.1:{free_dns_port()}",
        "sandbox_mx_network": network,
        "delivery_port": port,
    }
    values.update(overrides)
    return load_settings(**values)


def environment(settings: Settings) -> dict[str, str]:
    """The AXIOM_* variables that give another process these settings' world."""
    return {
        "AXIOM_HOME": str(settings.home),
        "AXIOM_SANDBOX_DNS_LISTEN": settings.sandbox_dns_listen,
        "AXIOM_SANDBOX_MX_NETWORK": settings.sandbox_mx_network,
        "AXIOM_DELIVERY_PORT": str(settings.delivery_port),
        "AXIOM_DNS_NAMESERVERS": settings.sandbox_dns_listen,
    }
