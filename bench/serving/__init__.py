"""Serving benchmark: an OpenAI-compatible streaming load generator, a transformers baseline server
and a driver that runs them side by side with the mesh (see docs/serving_benchmark.md)."""
