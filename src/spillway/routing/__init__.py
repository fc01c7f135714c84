"""Routing: which node answers a request, and fallback up to the commit point."""
