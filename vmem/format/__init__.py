"""Bytes on the wire and in files: every layout is drawn once, in the module that defines it.

* :mod:`~vmem.format.wire` -- the constant tables (Xen/libxl record types, vmem control types).
* :mod:`~vmem.format.stream` -- Xen migration stream v2/v3 framing: writer and bounded reader.
* :mod:`~vmem.format.postcopy` -- post-copy record bodies (PFN lists, fault requests).

Knows nothing of migration, guests or transport beyond the bytes.
"""
