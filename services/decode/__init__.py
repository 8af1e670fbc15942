"""The decode service (python -m services.decode)."""
