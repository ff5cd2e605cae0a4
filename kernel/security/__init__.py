"""Principals (agents and operators), access rules and grants, quotas, the gate and the audit log."""
