"""registrar: registers Docker containers in etcd v3, bound to leases, for service discovery."""

__version__ = "0.1.0"
