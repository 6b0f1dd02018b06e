"""Human sizes on the command line: 256M, 64G, 0x1000, 4096."""

from __future__ import annotations

import re

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"(0x[0-9a-f]+|\d+)([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from a size with an optional binary suffix; ValueError with the reason otherwise."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 0x1000, 2M, 256M, 64G)")
    number, suffix = m.groups()
    return int(number, 0) * _SUFFIX[suffix.upper()]


def format_size(size: int) -> str:
    for suffix in ("T", "G", "M", "K"):
        unit = _SUFFIX[suffix]
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
