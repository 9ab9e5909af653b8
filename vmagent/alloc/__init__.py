"""Allocations: what a VM is promised (guarantees) and allowed (limits) on its host, and
where a VM goes in the fleet (docs/allocation.md).

``sizing`` and ``placement`` are pure and part of the contract (vmctl imports them);
``config`` reads the agent's config file; ``cgroup`` enforces (v1 and v2 behind one
interface); ``capacity`` is the host's ledger of reservations and its admission;
``gpu`` the host's vfio-pci devices; ``service`` ties them to the VMs' life.
"""
