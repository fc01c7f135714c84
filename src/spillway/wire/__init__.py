"""The OpenAI wire format: request checks, SSE, and stream relaying. No I/O here."""
