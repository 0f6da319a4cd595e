"""vicd: a Docker Engine API daemon that runs every container in a VM of its own."""

__version__ = "0.1.0"
