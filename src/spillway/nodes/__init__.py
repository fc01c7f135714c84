"""Upstream nodes: the HTTP client every engine shares, the managed llama.cpp node, tokens."""
