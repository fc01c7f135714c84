"""Whether a cached prompt means the same as a new one: the semantic cache's hit decision.

A cosine threshold alone is a poor judge: on Quora question pairs, all-MiniLM-L6-v2 puts many
pairs that differ in one decisive word ("Messi" and "Ronaldo" swapped, "2016" vs "2017",
"for" vs "against") above 0.98, so no cosine threshold reaches 95 % precision on the held-out
pairs with any useful recall. The decision here has two parts, both cheap on the request path:

1. A small **learned verifier** (five cross-fitted, calibrated MLPs; weights in
   ``verifier.npz``) reads the two MiniLM vectors (their elementwise product and absolute
   difference, which say *where* the meanings differ, not just how much) and a few lexical
   agreements: overlaps, IDF-weighted overlaps (one rare word apart matters more than several
   common ones), word order, numbers, negation, names. It returns a probability-like score.
   The same prompt up to case, spacing and closing punctuation always scores 1.0. Runtime is
   numpy only; scikit-learn trains it (``training/train_verifier.py``), never imported.

2. **Guards** veto a hit outright, whatever the model says. Each was measured on the tuning
   split; the ones enabled are listed in the weights file's metadata:

   - ``numbers`` (on): the sets of digit strings differ ("top 10" vs "top 5"). On QQP's labels
     it costs recall (0.048 -> 0.045 at 96 % tune precision) because Quora merges template
     questions ("Kerala for 6-7 days" / "for 3 to 4 days"); for a cache those differ.
   - ``negation`` (off): "not", "never", "can't"... in one text only. Nearly all its vetoes of
     high scores were paraphrases ("Why doesn't anybody answer" / "Why will no one answer").
   - ``entities`` (off): a capitalised word of one text is absent from the other. Quora's
     capitalisation is too loose: it vetoes 20 % of duplicates.
   - ``order`` (off): shared content words reordered; mostly paraphrases. The model's
     word-order feature catches the swaps that matter ("Messi" / "Ronaldo").

``SemanticMatcher`` combines the two over the neighbours a vector index returned.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from spillway.cache.vectors import Neighbour

#: The shipped default operating point (precision first), chosen on the tuning split by
#: ``training/train_verifier.py``; equal to ``Verifier.load().threshold``.
DEFAULT_THRESHOLD: float = 0.955
WEIGHTS_PATH = Path(__file__).with_name("verifier.npz")

Floats = npt.NDArray[np.float32]

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# A comma joins digits only as a thousands separator ("1,000"): "500,1000" is two numbers and
# "1,2,3" three, not 5001000 and 123.
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d|,\d)(?:\.\d+)*|\d+(?:\.\d+)*")
_CAPITALISED = re.compile(r"\b[A-Z][A-Za-z0-9]*[a-z0-9][A-Za-z0-9]*\b|\b[A-Z]{2,}\b")
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_MARK = re.compile(r" ([?!.,;:])")
_SENTENCE_START = re.compile(r"(?:^|[.?!:;\"(]\s*)([A-Z][A-Za-z0-9']*)")


def _words(spaced: str) -> frozenset[str]:
    return frozenset(spaced.split())


_NEGATIONS = _words(
    "not no never none nothing nobody nowhere neither nor without cannot cant dont doesnt didnt "
    "isnt arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt"
)
_WH = ("what", "why", "how", "which", "who", "whom", "whose", "when", "where", "is", "are",
       "can", "do", "does", "should", "will")  # fmt: skip
_STOP = _words(
    "a an the of to in on for and or is are was were be been being do does did i you he she it "
    "we they me my your our their his her its this that these those there here what why how "
    "which who whom when where can could should would will shall may might must with by from at "
    "as about into than then so if any some all most more much many very just also get best "
    "good way ways someone one thing things s"
)
_ORDER_WORDS = 48  # the order feature is quadratic: compare the first 48 content words only


@dataclass(frozen=True, slots=True)
class Lexical:
    """What the guards and the lexical features need from one text, computed once."""

    normal: str  # case, spacing and final punctuation normalised (see ``_normal``)
    tokens: frozenset[str]
    content: frozenset[str]
    sequence: tuple[str, ...]  # distinct content words in order of first use (capped)
    bigrams: frozenset[tuple[str, str]]
    numbers: frozenset[str]
    negated: bool
    entities: frozenset[str]  # lower-cased capitalised words that do not open a sentence
    wh: str  # the first question word, or ""
    n_tokens: int


def _normal(text: str) -> str:
    """Case, runs of spaces, spaces before punctuation and closing ?!. evened out: equal here
    means the same prompt. Nothing else is dropped ("C++" is not "C#")."""
    text = _SPACE.sub(" ", text.casefold()).strip()
    return _SPACE_BEFORE_MARK.sub(r"\1", text).rstrip("?!. ")


def analyse(text: str) -> Lexical:
    """Tokenise once; every feature and guard of a pair reads two of these."""
    text = text.replace("\u2019", "'")  # "doesn\u2019t" (typographic) is "doesn't"
    words = _TOKEN.findall(text.lower())
    openers = {m.group(1) for m in _SENTENCE_START.finditer(text)}
    entities = {w.lower() for w in _CAPITALISED.findall(text) if w not in openers and w != "I"}
    numbers = {n.replace(",", "") for n in _NUMBER.findall(text)}
    negated = any(w.replace("'", "") in _NEGATIONS or w.endswith("n't") for w in words)
    wh = next((w for w in words if w in _WH), "")
    content = [w for w in words if w not in _STOP]
    return Lexical(
        normal=_normal(text),
        tokens=frozenset(words),
        content=frozenset(content),
        sequence=tuple(dict.fromkeys(content))[:_ORDER_WORDS],
        bigrams=frozenset(itertools.pairwise(words)),
        numbers=frozenset(numbers),
        negated=negated,
        entities=frozenset(entities),
        wh=wh,
        n_tokens=len(words),
    )


def word_order(a: Lexical, b: Lexical) -> float:
    """The share of shared content words kept in relative order (1.0: same order). "Is Messi
    better than Ronaldo?" and its mirror share every word and vector, but order 1/3."""
    shared = set(a.sequence) & set(b.sequence)
    if not shared:
        return 1.0
    xs = [w for w in a.sequence if w in shared]
    ys = [w for w in b.sequence if w in shared]
    row = [0] * (len(ys) + 1)  # longest common subsequence, one row at a time
    for x in xs:
        diagonal = 0
        for j, y in enumerate(ys):
            above = row[j + 1]
            row[j + 1] = diagonal + 1 if x == y else max(above, row[j])
            diagonal = above
    return row[-1] / len(shared)


class Idf:
    """Inverse document frequency of words, hashed into buckets, learned from the tuning texts.
    Only bucket weights ship, never words. A word the texts did not repeat weighs ``unseen``
    (as a word seen once): rare words are what make two otherwise equal questions differ."""

    def __init__(self, weights: Floats, unseen: float) -> None:
        self.weights = weights
        self.unseen = unseen

    @staticmethod
    def bucket(word: str, buckets: int) -> int:
        return zlib.crc32(word.encode()) & (buckets - 1)  # stable across runs, unlike hash()

    def __call__(self, word: str) -> float:
        return float(self.weights[self.bucket(word, len(self.weights))])

    def total(self, words: frozenset[str]) -> float:
        return sum(self(w) for w in words)


# --- guards: a True return vetoes the hit --------------------------------------------------


def _numbers_differ(a: Lexical, b: Lexical) -> bool:
    return a.numbers != b.numbers


def _negation_differs(a: Lexical, b: Lexical) -> bool:
    return a.negated != b.negated


def _entities_differ(a: Lexical, b: Lexical) -> bool:
    # An entity of one text must occur somewhere in the other (as any token): capitalisation on
    # Quora, as in chat prompts, is too inconsistent to demand it on both sides.
    return not (a.entities <= b.tokens and b.entities <= a.tokens)


def _order_differs(a: Lexical, b: Lexical) -> bool:
    return word_order(a, b) < 1.0


GUARDS: dict[str, Callable[[Lexical, Lexical], bool]] = {
    "numbers": _numbers_differ,
    "negation": _negation_differs,
    "entities": _entities_differ,
    "order": _order_differs,
}


def vetoed(a: Lexical, b: Lexical, guards: Sequence[str]) -> str | None:
    """The name of the first guard in ``guards`` that vetoes the pair, or None."""
    for name in guards:
        if GUARDS[name](a, b):
            return name
    return None


# --- features -------------------------------------------------------------------------------

LEXICAL_FEATURES = (
    "cosine", "jaccard", "jaccard_content", "jaccard_bigrams", "length_ratio",
    "extra_content_min", "extra_content_max", "numbers_both_none", "numbers_differ",
    "negation_differs", "entities_differ", "wh_same", "word_order", "order_differs",
    "idf_jaccard", "idf_max_unshared", "idf_extra_min", "idf_extra_max",
)  # fmt: skip


def _jaccard(x: frozenset[Any], y: frozenset[Any]) -> float:
    union = len(x | y)
    return len(x & y) / union if union else 1.0


def lexical_features(a: Lexical, b: Lexical, cosine: float, idf: Idf) -> list[float]:
    """The named, symmetric scalar features of a pair (order as ``LEXICAL_FEATURES``). The IDF
    ones weigh what is not shared: one rare word ("king" / "royal" penguins) outweighs many."""
    only_a, only_b = a.content - b.content, b.content - a.content
    longest = max(a.n_tokens, b.n_tokens)
    weight = {w: idf(w) for w in a.content | b.content}  # one hash per word, not five
    union = sum(weight.values())
    extra_a, extra_b = sum(weight[w] for w in only_a), sum(weight[w] for w in only_b)
    order = word_order(a, b)
    return [
        cosine,
        _jaccard(a.tokens, b.tokens),
        _jaccard(a.content, b.content),
        _jaccard(a.bigrams, b.bigrams),
        min(a.n_tokens, b.n_tokens) / longest if longest else 1.0,
        math.log1p(min(len(only_a), len(only_b))),
        math.log1p(max(len(only_a), len(only_b))),
        float(not a.numbers and not b.numbers),
        float(_numbers_differ(a, b)),
        float(_negation_differs(a, b)),
        float(_entities_differ(a, b)),
        float(a.wh == b.wh),
        order,
        float(order < 1.0),
        sum(weight[w] for w in a.content & b.content) / union if union else 1.0,
        max((weight[w] for w in only_a | only_b), default=0.0),
        min(extra_a, extra_b),
        max(extra_a, extra_b),
    ]


def _unit(x: npt.NDArray[Any]) -> Floats:
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)  # type: ignore[no-any-return]


def pair_features(
    lex_a: Sequence[Lexical], u: npt.NDArray[Any], lex_b: Sequence[Lexical], v: npt.NDArray[Any],
    idf: Idf,
) -> Floats:  # fmt: skip
    """The verifier's input rows: ``[u*v, |u-v|, lexical]``, symmetric in (a, b).

    Shared by training and runtime so the two can never drift apart.
    """
    u, v = _unit(u), _unit(v)
    cosines = np.einsum("ij,ij->i", u, v)
    pairs = zip(lex_a, lex_b, cosines, strict=True)
    rows = [lexical_features(x, y, float(c), idf) for x, y, c in pairs]
    lexical = np.array(rows, dtype=np.float32).reshape(len(cosines), len(LEXICAL_FEATURES))
    return np.concatenate([u * v, np.abs(u - v), lexical], axis=1)


# --- the model ------------------------------------------------------------------------------

Layers = list[tuple[Floats, Floats]]


class Verifier:
    """A trained pair scorer: standardise, then the mean of a few ReLU MLPs' sigmoid outputs.

    Member k learned from all tuning pairs but fold k; its output layer was then rescaled
    (Platt scaling, folded into the weights) into a calibrated probability on fold k, unseen.
    Calibration makes a threshold mean the same precision from one training run to the next
    (uncalibrated, alike-trained MLPs put it anywhere from 0.98 to 0.999); averaging steadies
    the top of the ranking, where precision lives.

    The weights file holds ``mean``, ``scale``, ``idf`` (bucket weights), ``m{k}_w{i}`` and
    ``m{k}_b{i}`` for member k's layer i, and ``meta`` (a JSON string: version, features,
    guards, threshold, floor, training-set size, tuning-split figures).
    """

    def __init__(
        self, mean: Floats, scale: Floats, members: list[Layers], idf: Idf, meta: dict[str, Any]
    ) -> None:
        self._mean = mean
        self._scale = scale
        self._members = members
        self.idf = idf
        self.meta = meta
        self.guards: tuple[str, ...] = tuple(meta.get("guards", ()))
        self.threshold = float(meta.get("threshold", DEFAULT_THRESHOLD))

    @classmethod
    def load(cls, path: Path | None = None) -> Verifier:
        """Load the shipped weights (``verifier.npz`` next to this module) or ``path``."""
        with np.load(path or WEIGHTS_PATH, allow_pickle=False) as data:
            meta: dict[str, Any] = json.loads(str(data["meta"]))

            def f32(name: str) -> Floats:
                # Stored as float16 to halve the file; computed in float32.
                return data[name].astype(np.float32)  # type: ignore[no-any-return]

            members = [
                [(f32(f"m{k}_w{i}"), f32(f"m{k}_b{i}")) for i in range(int(meta["layers"]))]
                for k in range(int(meta["members"]))
            ]
            idf = Idf(f32("idf"), float(meta["idf_unseen"]))
            mean, scale = f32("mean"), f32("scale")
        unknown = set(meta.get("guards", ())) - GUARDS.keys()
        if unknown:
            raise ValueError(f"verifier weights name unknown guards: {sorted(unknown)}")
        return cls(mean, scale, members, idf, meta)

    def member(self, k: int) -> Verifier:
        """Member k alone. It never saw tune fold k, so on that fold its scores are the
        honest out-of-fold ones (``training/train_cross_encoder.py`` calibrates on folds 0
        and 1)."""
        return Verifier(self._mean, self._scale, [self._members[k]], self.idf, self.meta)

    def judge(
        self, lex_a: Sequence[Lexical], u: npt.NDArray[Any], lex_b: Sequence[Lexical],
        v: npt.NDArray[Any],
    ) -> Floats:  # fmt: skip
        """Each pair's score, guards not applied: the model's, but 1.0 for the same prompt
        (``Lexical.normal`` equal). QQP's non-duplicates were picked for being lexically close,
        so the model distrusts near-identical pairs: a quarter of identical ones score low."""
        scores = self.predict(pair_features(lex_a, u, lex_b, v, self.idf))
        same = np.array([a.normal == b.normal for a, b in zip(lex_a, lex_b, strict=True)])
        return np.where(same, np.float32(1.0), scores).astype(np.float32)

    def predict(self, features: Floats) -> Floats:
        """The model's scores in [0, 1] for rows built by ``pair_features``."""
        x = (features - self._mean) / self._scale
        total = np.zeros(len(x), dtype=np.float32)
        for layers in self._members:
            h = x
            for i, (w, b) in enumerate(layers):
                h = h @ w + b
                if i < len(layers) - 1:
                    h = np.maximum(h, 0.0)
            z = np.clip(h[:, 0], -40.0, 40.0)  # no overflow warning in exp
            total += 1.0 / (1.0 + np.exp(-z))
        return (total / len(self._members)).astype(np.float32)

    def judge_neighbours(
        self, asked: Lexical, qvec: npt.NDArray[Any], cached: Sequence[Lexical],
        near: Sequence[Neighbour],
    ) -> Floats:  # fmt: skip
        """``judge`` of one query against each of the index's neighbours (texts analysed)."""
        qvecs = np.repeat(np.asarray(qvec, dtype=np.float32).reshape(1, -1), len(near), axis=0)
        cvecs = np.stack([np.asarray(n.vector, dtype=np.float32) for n in near])
        return self.judge([asked] * len(near), qvecs, cached, cvecs)

    def scores(
        self, queries: list[str], qvecs: npt.NDArray[Any], candidates: list[str],
        cvecs: npt.NDArray[Any],
    ) -> Floats:  # fmt: skip
        """The score of each pair (queries[i], candidates[i]); guards not applied."""
        lex_q = [analyse(t) for t in queries]
        lex_c = [analyse(t) for t in candidates]
        return self.judge(lex_q, qvecs, lex_c, cvecs)

    def score(
        self, query: str, qvec: npt.NDArray[Any], candidate: str, cvec: npt.NDArray[Any]
    ) -> float:
        """The score of one pair; guards not applied."""
        return float(self.scores([query], qvec, [candidate], cvec)[0])

    def veto(self, query: str, candidate: str) -> str | None:
        """The first enabled guard that vetoes the pair, or None."""
        return vetoed(analyse(query), analyse(candidate), self.guards)


class SemanticMatcher:
    """Picks the cached prompt (if any) that a new prompt may be answered from.

    Neighbours under the cosine ``floor`` (the larger of the argument and the weights file's)
    are not scored: no tuning pair under it scored anywhere near a hit.
    """

    def __init__(self, verifier: Verifier | None = None, floor: float = 0.0) -> None:
        self.verifier = verifier or Verifier.load()
        self.floor = max(floor, float(self.verifier.meta.get("floor", 0.0)))

    async def best(
        self, query: str, qvec: npt.NDArray[Any], neighbours: list[Neighbour], threshold: float
    ) -> Neighbour | None:
        """The highest-scoring neighbour that scores >= ``threshold`` and passes the guards."""
        near = [n for n in neighbours if n.similarity >= self.floor]
        if not near:
            return None
        lex_q = analyse(query)
        lex_n = [analyse(n.text) for n in near]
        scores = self.verifier.judge_neighbours(lex_q, qvec, lex_n, near)
        for i in np.argsort(-scores, kind="stable"):
            if scores[i] < threshold:
                return None
            if vetoed(lex_q, lex_n[i], self.verifier.guards) is None:
                return near[int(i)]
        return None
