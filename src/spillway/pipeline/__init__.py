"""The request pipeline: one protocol-neutral path from an authenticated caller's request to
an answer or an open stream, whichever front door it came through (OpenAI's routes, later
Anthropic's Messages API and the batch worker). No aiohttp object enters it.

principal → cache probe → lookup → merging → budget → dispatch (commit point) → relay →
exactly one ledger record. ``service.Pipeline`` is the entry; ``calls`` holds what goes in
and what comes out.
"""
