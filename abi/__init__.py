"""The syscall vocabulary shared by every layer and transport: the syscalls as typed values, the one error
type and the trace record. Imports nothing of the kernel."""
