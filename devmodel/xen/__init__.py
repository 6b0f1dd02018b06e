"""Xen: the host interfaces an ioreq server needs, behind one contract (platform.py).

The transport (devmodel/transports/xen.py) talks only to `XenPlatform`; the real one binds
Xen's tool libraries through ctypes, the simulated one (tests) plays the hypervisor.
"""
