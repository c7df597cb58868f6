"""A simulated cluster on one machine, for the real tier, ``make bench`` and ``make demo``.

N hosts (each a network namespace with its own Docker engine and later its own
``registrar watch``), a 3-member etcd (a namespace each), routers (a namespace each for a
``registrar haproxy``), and an ops namespace with Prometheus and the client load, on one
bridge in a "switch" namespace. The test process stays in the root namespace and reaches
them only through forwarders on 127.0.0.1. See README.md in this directory.
"""

from .cleanup import Resources, cleanup_leftovers, find_resources, remove_resources
from .cluster import (
    Cluster,
    ClusterContainer,
    ClusterError,
    EtcdMember,
    Host,
    MemoryReport,
    Node,
    OpsNode,
    Router,
)
from .load import ClientLoad, LoadStats
from .netns import NetnsForwarder, exec_in, http_get_in, socket_in
from .procs import NsProcess

__all__ = [
    "ClientLoad",
    "Cluster",
    "ClusterContainer",
    "ClusterError",
    "EtcdMember",
    "Host",
    "LoadStats",
    "MemoryReport",
    "NetnsForwarder",
    "Node",
    "NsProcess",
    "OpsNode",
    "Resources",
    "Router",
    "cleanup_leftovers",
    "exec_in",
    "find_resources",
    "http_get_in",
    "remove_resources",
    "socket_in",
]
