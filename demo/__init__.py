"""`make demo`: the deploy flow on a simulated cluster, narrated (see walkthrough.py)."""
