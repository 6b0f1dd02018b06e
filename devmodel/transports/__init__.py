"""The vfio-user transport: a socket loop (vfio_user.py) over its requests (vfio_user_requests.py).

Every transport turns a hypervisor interface's guest accesses into calls on the device backend
(devmodel/backend); the Xen one lives with the rest of Xen in devmodel/xen.
"""
