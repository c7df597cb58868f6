"""``python -m tests.cluster.leftovers [--list] [--prefix P]``: remove (or list) what crashed
simulated-cluster runs left behind, found by name. Never touches a cluster whose owner
process still runs (unless named with ``--prefix``)."""

from .cleanup import main

if __name__ == "__main__":
    raise SystemExit(main())
