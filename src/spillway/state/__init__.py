"""State that replicas share through Redis (``[state] redis_url``), and its local fallback:
the connection and its outages (``redis``), per-key rate limits (``buckets``, ``limits``)."""
