"""The KVM guest backend: a real VM (one vCPU running guests/kvm/program.S) behind the
same protocols as the process guest.  :class:`KvmGuest` is the migrator's handle;
guests/kvm/runtime.py is the process that owns the VM."""
from guests.kvm.launch import KvmGuest, kvm_unavailable_reason

__all__ = ["KvmGuest", "kvm_unavailable_reason"]
