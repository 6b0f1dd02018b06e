"""The lease engine: the state of every window of the aperture, revoke and page-in.

It knows nothing about transports or sockets: transports call `LeaseEngine.read/write` (the
`Aperture` protocol), the lender side calls `grant/revoke/page_in_done/lender_lost`, and the
engine reaches the lender only through the `LenderPort` it was given.
"""
