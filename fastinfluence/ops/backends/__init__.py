"""Compiled backends (``cuda``, ``cpu``) that wrap the extension built from ``csrc/``."""
