"""What a key's rate limits looked like once a request was counted against them.

The meaning behind OpenAI's ``x-ratelimit-*`` headers, without the headers: the pipeline
attaches one to an answer or to a refusal, and each front door renders it its own way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Quota:
    #: the key's rpm (None: no requests limit)
    limit_requests: int | None
    remaining_requests: int
    #: seconds until the requests bucket is full again
    reset_requests_s: float
    #: the key's tpm (None: no tokens limit)
    limit_tokens: int | None
    remaining_tokens: int
    reset_tokens_s: float
