"""Transports: each one turns a hypervisor interface's guest accesses into calls on the device."""
