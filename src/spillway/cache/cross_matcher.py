"""The local semantic cache's hit decision: two judges that fail differently, averaged.

1. The **verifier** (``cache.verifier``: MLPs over the two MiniLM vectors and lexical
   features, under a millisecond) scores every neighbour at or above its cosine floor. The
   numbers guard vetoes; the same prompt (up to case, spacing and closing punctuation) is a
   hit at once.
2. The **cross-encoder** (``cache.cross_encoder``, about 4 ms a pair on 2 cores) reads the
   query together with the best-scored neighbour (``candidates``, 1 by default: the
   verifier's runner-up is rarely the hit, and each pass costs a sixth of the lookup budget),
   if its verifier score reaches the ``prescreen``. Below that no calibration pair reached the
   threshold, so most misses never pay for a pass.
3. The hit score is the mean of the two log-odds, as a probability; the candidate is the hit
   if that reaches the threshold.

Why both: each alone tops out near 95 % precision at low recall on questions neither saw,
and their mistakes differ (the verifier trusts shared rare words, the cross-encoder
token-by-token alignment). On held-out Quora pairs, at precision 0.95 the blend finds 1.5
times the verifier's hits, and on those whose texts never occur in training it reaches 0.95
where the verifier alone never does (docs/cache.md has the figures). The weights are equal:
weighting either side measured no better.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from spillway.cache.vectors import Neighbour, Vector
from spillway.cache.verifier import Verifier, analyse, vetoed

#: The shipped operating point (a blended probability), chosen by
#: ``training/train_cross_encoder.py`` on tune pairs neither model trained on; equal to the
#: adapter's ``meta["threshold"]`` (a test checks).
DEFAULT_THRESHOLD = 0.9408
T = TypeVar("T")
Floats = npt.NDArray[np.float32]


class ModelThread(Protocol):
    """Where the local models run: one thread, the local embedder's (``LocalMiniLM.run``)."""

    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...


class Judge(Protocol):
    """A pair scorer: ``cache.cross_encoder.CrossEncoder``, or a stand-in in tests."""

    meta: dict[str, Any]

    def probabilities(self, firsts: Sequence[str], seconds: Sequence[str]) -> Floats: ...


def load_shipped() -> Judge:
    """The shipped cross-encoder (builds an onnxruntime session: call it on the model thread)."""
    from spillway.cache.cross_encoder import CrossEncoder

    return CrossEncoder.load()


def blend(verifier: npt.ArrayLike, cross: npt.ArrayLike) -> Floats:
    """The hit score: the mean of the two models' log-odds, as a probability."""
    v = np.clip(np.asarray(verifier, dtype=np.float64), 1e-6, 1 - 1e-6)
    c = np.clip(np.asarray(cross, dtype=np.float64), 1e-6, 1 - 1e-6)
    mean = (np.log(v / (1 - v)) + np.log(c / (1 - c))) / 2
    return (1 / (1 + np.exp(-mean))).astype(np.float32)


class CrossEncoderMatcher:
    """Picks the cached prompt (if any) a new prompt may be answered from."""

    def __init__(
        self,
        thread: ModelThread,
        verifier: Verifier | None = None,
        load: Callable[[], Judge] = load_shipped,
        *,
        candidates: int = 1,
    ) -> None:
        self._thread = thread
        self.verifier = verifier or Verifier.load()
        self._load = load
        self._judge: Judge | None = None
        self.candidates = candidates
        self.floor = float(self.verifier.meta.get("floor", 0.0))
        #: verifier scores below this never get a pass (the cross-encoder's, once loaded)
        self.prescreen = 0.0

    async def warm(self) -> None:
        """Load the cross-encoder on the model thread (about a third of a second)."""
        await self._thread.run(self._loaded)

    async def best(
        self, query: str, qvec: Vector, neighbours: list[Neighbour], threshold: float
    ) -> Neighbour | None:
        """The neighbour most probably the same question, if that reaches ``threshold``."""
        near = [n for n in neighbours if n.similarity >= self.floor]
        if not near:
            return None
        picked = self._candidates(query, qvec, near)
        if isinstance(picked, Neighbour):
            return picked  # the same prompt
        if not picked:
            return None
        texts = [n.text for n, _ in picked]
        cross = await self._thread.run(self._probabilities, texts, query)
        scores = blend([score for _, score in picked], cross)
        i = int(np.argmax(scores))
        return picked[i][0] if scores[i] >= threshold else None

    def _candidates(
        self, query: str, qvec: Vector, near: list[Neighbour]
    ) -> Neighbour | list[tuple[Neighbour, float]]:
        """The same prompt if one is near, else the best few by verifier score."""
        asked = analyse(query)
        cached = [analyse(n.text) for n in near]
        scores = self.verifier.judge_neighbours(asked, qvec, cached, near)
        picked: list[tuple[Neighbour, float]] = []
        for i in np.argsort(-scores, kind="stable"):
            if vetoed(asked, cached[i], self.verifier.guards) is not None:
                continue
            if cached[i].normal == asked.normal:
                return near[int(i)]
            if scores[i] < self.prescreen or len(picked) == self.candidates:
                break
            picked.append((near[int(i)], float(scores[i])))
        return picked

    def _loaded(self) -> Judge:
        if self._judge is None:
            self._judge = self._load()
            self.prescreen = float(self._judge.meta.get("prescreen", 0.0))
        return self._judge

    def _probabilities(self, cached: list[str], query: str) -> Floats:
        return self._loaded().probabilities(cached, [query] * len(cached))
