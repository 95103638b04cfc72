"""Operator tools (command-line), run as python -m tools.<name>."""
