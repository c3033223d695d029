"""Helpers shared by several test modules (importable because pyproject sets ``pythonpath = ["tests"]``)."""
