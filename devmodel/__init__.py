"""devmodel: a per-guest device model whose PCI BAR lends a guest memory owned by another domain."""

__version__ = "0.1.0"
