"""Tools: the manager (the tools use case), built-ins, and the sandbox registered tools run in."""
