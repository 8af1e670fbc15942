"""The prefill service (python -m services.prefill)."""
