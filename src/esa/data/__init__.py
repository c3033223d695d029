"""Corpora (text sources) and evaluation windows (token layouts with a scored-token mask)."""
