"""Infrastructure for the real tests: private etcd servers/clusters, an etcd reader,
TCP/unix forwarders to cut connections, Docker helpers, and the registrar process wrapper."""
