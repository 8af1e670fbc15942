"""Llama-family models: the folder format the engine loads, and preparing the demo model.

Submodules are imported where they are used (``scalellm.models.prepare`` stays torch-free until it
builds); this package imports nothing on its own.
"""
