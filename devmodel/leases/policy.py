"""What an access gets when its window cannot be served (DESIGN: "failure policy")."""

from __future__ import annotations

import enum
import errno

from devmodel.pci.errors import AccessError


class FailurePolicy(enum.Enum):
    # What real hardware gives for a master abort: reads all-ones, writes vanish.
    ALL_ONES = "all-ones"
    # Reads return zeros, writes are dropped: kinder to guests that trust what they read.
    ZEROS = "zeros"
    # The transport answers with an error (under QEMU the guest then reads all-ones too, and
    # QEMU logs every such access).
    ERROR = "error"

    def read_result(self, size: int) -> bytes:
        if self is FailurePolicy.ALL_ONES:
            return b"\xff" * size
        if self is FailurePolicy.ZEROS:
            return bytes(size)
        raise AccessError(errno.EIO, "lent memory is unavailable")

    def write_result(self) -> None:
        if self is FailurePolicy.ERROR:
            raise AccessError(errno.EIO, "lent memory is unavailable")
