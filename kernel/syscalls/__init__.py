"""Use cases, one per syscall family, transport-free: what each syscall means."""
