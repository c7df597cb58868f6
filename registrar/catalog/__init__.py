"""`registrar catalog`: the cluster at a glance, served from memory."""
