"""Integers drawn from names: the one rule by which an image's noise, its references and its bootstrap subset
depend only on (seed, class, index), on every machine and in every process.

A leaf module (it imports nothing of the package), so every layer may use it.
"""

from __future__ import annotations

import hashlib


def derived_int(*parts: object) -> int:
    """64 bits of the SHA-256 of the parts joined by `/`: `derived_int(0, "Pine Warbler", 3)`."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")
