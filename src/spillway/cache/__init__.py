"""The response cache: exact and semantic, scoped per tenant (see docs/cache.md)."""
