"""Durable state of the kernel: SQLite databases (WAL), the trace log; later versioned files and adapters."""
