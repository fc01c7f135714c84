"""The semantic index contract: in-process numpy (``numpy_index``), PostgreSQL with pgvector
(``pgvector_index``). A *scope* is a tenant-keyed HMAC of everything but the last user turn
(``cache.keys``), so a search never sees another tenant's or another context's entries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]  # 1-D, L2-normalised


@dataclass(frozen=True, slots=True)
class VectorEntry:
    """One cached prompt: its exact key (where the answer is), its text and embedding."""

    key: str
    scope: str
    tenant: str
    model: str
    text: str
    vector: Vector
    expires_at: float  # wall-clock epoch seconds


@dataclass(frozen=True, slots=True)
class Neighbour:
    key: str
    text: str
    vector: Vector
    similarity: float  # cosine


class VectorIndex(Protocol):
    """Nearest cached prompts within one scope. Methods may raise on an outage."""

    async def open(self) -> None:
        """Connect (and create what is missing). A failure here is logged, not fatal: later
        calls try again."""
        ...

    async def search(self, scope: str, vector: Vector, k: int) -> list[Neighbour]:
        """Up to ``k`` unexpired entries of ``scope``, most similar first."""
        ...

    async def add(self, entry: VectorEntry) -> None:
        """Add (or replace, by key) an entry."""
        ...

    async def clear(self, tenant: str | None = None, model: str | None = None) -> int:
        """Delete every entry of ``tenant`` and/or ``model`` (all when both are None)."""
        ...

    async def count(self) -> int:
        """Unexpired entries in all scopes."""
        ...

    async def aclose(self) -> None: ...
