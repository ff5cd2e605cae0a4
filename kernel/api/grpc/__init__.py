"""The gRPC transport: the server, the one interceptor every RPC passes, and one thin servicer per service."""
