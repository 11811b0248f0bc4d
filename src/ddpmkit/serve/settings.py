"""How a server runs: where it listens, how many requests it samples at once and keeps waiting, and
what one request may ask of it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_images: int = 64  # images per request
    max_frames: int = 20  # about this many pictures of the reverse process streamed (and kept for the GIF)
    max_seed: int = 2**31 - 1


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"  # loopback: this machine only
    port: int = 7860
    limits: Limits = field(default_factory=Limits)
    concurrency: int = 1  # sampling requests served at once; the others wait in the queue
    queue_size: int = 16  # requests that may wait; more are refused ("queue is full")


def exposure_warning(host: str) -> str | None:
    """A warning when `host` is not a loopback address: the page is then open to other machines."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to any interface
        pass
    return (
        f"listening on {host} opens the page to every machine that can reach this one, with no login: "
        "anyone there can sample with these models on this machine's CPU or GPU"
    )
