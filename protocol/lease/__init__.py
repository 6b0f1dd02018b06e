"""The lease protocol between a lender and the device model (docs/lease-protocol.md)."""
