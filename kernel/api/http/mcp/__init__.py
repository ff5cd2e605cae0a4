"""Kernos as an MCP server (/mcp): routes over the edge."""
