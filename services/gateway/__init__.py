"""The gateway service (python -m services.gateway)."""
