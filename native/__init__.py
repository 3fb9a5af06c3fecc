"""snapproof's native fixture layer: a thin Python API over C (cffi) for KVM,
Windows WHP, guest memory backings and the userfaultfd WP snapshot engine.

Importing ``native`` loads nothing platform-specific; the backend modules
(``native.kvm``, ``native.wp``, ``native.memory`` on Linux, ``native.whp`` on
Windows) load the compiled module when imported.
"""
