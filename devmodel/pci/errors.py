"""The one exception the PCI function raises for an access or request it refuses.

It lives apart from `function.py` so that `irqs.py`, `registers.py` and `config_space.py` can
raise it without importing the function that assembles them. Transports catch this type only
and turn `errno` into their wire's error (a vfio-user error reply, an all-ones ioreq read).
"""

from __future__ import annotations

import errno as _errno


class AccessError(Exception):
    """A refused access or request: `errno` is what a vfio server would answer with.

    Shape errors (bad size, misalignment, unknown region, malformed SET_IRQS) are EINVAL;
    a well-formed access that falls outside its region is EFAULT.
    """

    __slots__ = ("errno", "reason")

    def __init__(self, errno: int, reason: str) -> None:
        super().__init__(f"{_errno.errorcode.get(errno, str(errno))}: {reason}")
        self.errno = errno
        self.reason = reason
