"""Serve tests: a package, so the ``server`` fixture (package scope) stops its Ray head when they end."""
