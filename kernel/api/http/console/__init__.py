"""The operator console (`/console`) on the kernel's HTTP server."""
