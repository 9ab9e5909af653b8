"""vmagent: the per-host daemon that runs development VMs under qemu."""

__version__ = "0.1.0"
