"""Transports: they translate to and from the use cases in `syscalls/` and hold nothing of a syscall's meaning."""
