"""Routing analysis: traces of what the routers chose (`trace`) and their statistics (`stats`, NumPy only)."""
