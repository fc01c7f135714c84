"""The plain cosine matcher, for embedders the trained verifier does not know.

The verifier (``cache.verifier``) was trained on all-MiniLM-L6-v2 vectors; a node's own
embedding model lives in another space, so there the decision falls back to the configured
cosine threshold, behind the lexical vetoes (numbers, negation, names): all three, because
here no model weighs those signals (the verifier itself keeps only the numbers veto, the one
that measured right on its training data, and uses the others as features).
"""

from __future__ import annotations

from spillway.cache.vectors import Neighbour, Vector
from spillway.cache.verifier import analyse, vetoed

#: Without a trained model to weigh them, every cheap veto applies.
VETOES = ("numbers", "negation", "entities")


class CosineMatcher:
    async def best(
        self, query: str, qvec: Vector, neighbours: list[Neighbour], threshold: float
    ) -> Neighbour | None:
        """The most similar neighbour at or over ``threshold`` that no veto rules out."""
        asked = analyse(query)
        for near in sorted(neighbours, key=lambda n: n.similarity, reverse=True):
            if near.similarity < threshold:
                return None
            if vetoed(asked, analyse(near.text), VETOES) is None:
                return near
        return None
