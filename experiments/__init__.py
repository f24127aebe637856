"""Experiments that jora.py does not use (importable as `experiments.*` from the repository root)."""
