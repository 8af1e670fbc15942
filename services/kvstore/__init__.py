"""The kvstore service (python -m services.kvstore)."""
