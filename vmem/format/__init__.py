"""Bytes on the wire and in files: every layout is drawn once, in the module that defines it.

* :mod:`~vmem.format.wire` -- the constant tables (Xen/libxl record types, vmem control types).
* :mod:`~vmem.format.frame` -- the record frame all of them share, and the bounded exact reader.
* :mod:`~vmem.format.stream` -- Xen migration stream v2/v3 framing: writer and bounded reader.
* :mod:`~vmem.format.hvm` -- x86 HVM state records (X86_TSC_INFO, HVM_PARAMS, HVM_CONTEXT).
* :mod:`~vmem.format.control` -- vmem's control protocol (back channel) and preamble.
* :mod:`~vmem.format.postcopy` -- post-copy record bodies (PFN lists, fault requests).

Knows nothing of migration, guests or transport beyond the bytes.
"""
