"""Xen: the ioreq transport (server.py and its parts) and the host interfaces it needs.

The transport talks to Xen only through `XenPlatform` (platform.py); the real one binds Xen's
tool libraries through ctypes (host.py, libs.py), the simulated one (tests) plays the
hypervisor. Regions are found through the device backend's bus (devmodel/backend).
"""
