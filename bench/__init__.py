"""`make bench`: registrar against the classic shell sidekick, on real Docker and etcd."""
