"""Backends shipped with dshal itself (registered through entry points like any plugin)."""
