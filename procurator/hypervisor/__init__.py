"""Hypervisor backends: one protocol (base.py), one module per backend."""
