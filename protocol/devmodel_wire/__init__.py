"""devmodel's own wire formats, sans-IO: the lease protocol (`lease`), Xen's ioreq ABI (`xen`)
and the control protocol (`control`). No sockets, no trio, no threads, no file calls here.

They follow the conventions of `pyvfio_user.sansio` and raise subclasses of
`pyvfio_user.errors.ProtocolError`, so one `except ProtocolError` covers every parser.
"""
