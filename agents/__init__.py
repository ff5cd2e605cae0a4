"""Example agents and framework adapters. Each agent is a plain class using the SDK; see examples.py."""
