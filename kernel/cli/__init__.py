"""The `kernos` command line: the daemon, the demo, and commands that talk to a running kernel."""
