"""A cluster of kernels: nodes, their leases, agents' home nodes."""
