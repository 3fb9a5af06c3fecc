"""The nested test host: the suite run on the real kvm_amd module under QEMU TCG (see nested/kvm_amd.py)."""
