"""Resilience state machines: per-node circuit breakers, retry policy and budget, wait queues."""
