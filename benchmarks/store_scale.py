"""How the loop's durable state scales: PairStore + VectorFile + AnnIndex at 100k and 1M pairs.

Builds N synthetic pairs from the real RM-Bench and PandaLM texts in ../shared/data (unique
ids, so every pair is distinct), then runs the state operations of the curation loop as
docs/architecture.md lays them out, with a cheap embedder in place of MiniLM:

  ingest     insert every pair into the PairStore (batches of 10k, one transaction each)
  embed      **hashed bag-of-words features** (named as such: a stand-in for MiniLM, which
             this 2-core machine cannot run over 1M conversations in a benchmark) into the
             float16 VectorFile
  index      build the AnnIndex over D_un (IVF trained on a sample) and add every row
  stage1.t   8 iterations: move a seed / silver batch out of D_un, query the verified rows'
             vectors, retrieve k=8 neighbours each, move them to D_silver, remove them from
             the index
  stage2     stream D_un in batches, rewrite each record with a decision, move to stage2

It prints wall time and peak RSS per step, and the files' sizes. This measures the state
layer only; the loop's steps on top of it are the curation-loop issue's scale benchmark.

    .venv/bin/python benchmarks/store_scale.py --pairs 100000 1000000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from synpref.shared.ann import AnnIndex, VectorFile, training_rows
from synpref.shared.pairstore import PairStore
from synpref.v1.pair_pb2 import Decision, DecisionRecord, Message, Pair, PairRecord

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DIM = 128
WORD = re.compile(r"\w+")


def real_texts() -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples from RM-Bench (all 9 style pairs) and PandaLM."""
    out = []
    for name in ("chat", "code", "safety-refuse", "safety-response"):
        for item in json.loads((DATA / "RM-Bench" / f"{name}_filtered.json").read_text()):
            for i in range(3):
                for j in range(3):
                    out.append((item["prompt"], str(item["chosen"][i]), str(item["rejected"][j])))
    for row in json.loads((DATA / "PandaLM" / "testset-v1.json").read_text()):
        prompt = row["instruction"] + (("\n\n" + row["input"]) if row["input"] else "")
        out.append((prompt, str(row["response1"]), str(row["response2"])))
    return out


def synthetic_pairs(n: int, texts: list[tuple[str, str, str]]) -> Iterator[tuple[str, PairRecord]]:
    for i in range(n):
        prompt, chosen, rejected = texts[i % len(texts)]
        key = f"syn-{i:08d}"
        yield (
            key,
            PairRecord(
                pair=Pair(
                    id=key,
                    conversation=[Message(role="user", content=f"{prompt} [{i}]")],
                    chosen=[Message(role="assistant", content=chosen)],
                    rejected=[Message(role="assistant", content=rejected)],
                    source="synthetic-from-real",
                )
            ),
        )


def hashed_features(texts: list[str], dim: int = DIM) -> np.ndarray:
    """Signed feature hashing of lower-cased words: a cheap, deterministic stand-in embedder."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in WORD.findall(text.lower()):
            h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            out[row, h % dim] += 1.0 if (h >> 63) & 1 else -1.0
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(n: int, workdir: Path, iterations: int = 8, seed_rows: int = 1000) -> list[dict]:
    steps: list[dict] = []

    def timed(name: str, started: float) -> None:
        steps.append(
            {
                "pairs": n,
                "step": name,
                "seconds": round(time.perf_counter() - started, 2),
                "peak_rss_mb": round(peak_rss_mb()),
            }
        )
        print(json.dumps(steps[-1]), flush=True)

    texts = real_texts()
    store = PairStore(workdir / "pairs.sqlite")
    started = time.perf_counter()
    batch: list[tuple[str, str, PairRecord]] = []
    for key, rec in synthetic_pairs(n, texts):
        batch.append((key, "unverified", rec))
        if len(batch) == 10_000:
            store.add(batch)
            batch = []
    store.add(batch)
    timed("ingest", started)

    started = time.perf_counter()
    vectors = VectorFile.create(workdir / "vectors.f16", rows=n + 1, dim=DIM)
    for records in store.scan("unverified", batch=10_000):
        rows = [row for row, _ in records]
        feats = hashed_features([r.pair.conversation[0].content for _, r in records])
        vectors.write(rows[0], feats)  # rows are dense and ascending within a fresh store
    vectors.flush()
    timed("embed (hashed features)", started)

    started = time.perf_counter()
    rng = np.random.default_rng(0)
    sample_rows = np.sort(rng.choice(np.arange(1, n + 1), size=max(1, training_rows(n, DIM)), replace=False))
    index = AnnIndex.build(n, DIM, sample=vectors.read(sample_rows), nprobe=16)
    for start in range(1, n + 1, 50_000):
        rows = np.arange(start, min(start + 50_000, n + 1))
        index.add(rows, vectors.read(rows))
    index.save(workdir / "d_un.faiss")
    timed("index", started)

    started = time.perf_counter()
    seed = sorted(rng.choice(np.arange(1, n + 1), size=seed_rows, replace=False).tolist())
    store.move(seed, "gold", step="seed")
    index.remove(seed)
    timed("seed", started)

    for t in range(1, iterations + 1):
        started = time.perf_counter()
        verified = store.rows("gold", limit=n) + store.rows("silver", limit=2_000 * t)
        queries = vectors.read(verified[-2_000:])
        ids, _ = index.search(queries, 8)
        retrieved = sorted({int(i) for i in ids.ravel() if i >= 0})[:2_000]
        with store.transaction():
            store.move(retrieved, "silver", step=f"s1.{t}")
            store.set_meta("cursor:s1", str(t))
        index.remove(retrieved)
        timed(f"stage1.{t}", started)

    started = time.perf_counter()
    decision = DecisionRecord(decision=Decision.Value("DECISION_KEEP"), rule="benchmark", reason="state layer only")
    while True:
        chunk = next(store.scan("unverified", batch=10_000), None)
        if not chunk:
            break
        for _, rec in chunk:
            rec.decision.CopyFrom(decision)
        with store.transaction():
            store.put(chunk)
            store.move([row for row, _ in chunk], "stage2", step="s2")
            store.set_meta("cursor:s2", str(chunk[-1][0]))
    timed("stage2", started)
    sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in workdir.iterdir() if p.is_file()}
    print(json.dumps({"pairs": n, "counts": store.counts(), "files_mib": sizes}), flush=True)
    store.close()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workdir", default="", help="where the files go (default: a temp folder)")
    args = parser.parse_args()
    totals = {}
    for n in args.pairs:
        with tempfile.TemporaryDirectory(dir=args.workdir or None) as tmp:
            steps = run(n, Path(tmp))
        totals[n] = sum(s["seconds"] for s in steps)
        print(
            json.dumps(
                {"pairs": n, "total_seconds": round(totals[n], 1), "peak_rss_mb": max(s["peak_rss_mb"] for s in steps)}
            ),
            flush=True,
        )
    if len(totals) > 1:
        (small, t_small), (big, t_big) = min(totals.items()), max(totals.items())
        print(f"time ratio {t_big / t_small:.2f} for a pair ratio of {big / small:.0f} (linear = {big / small:.0f})")


if __name__ == "__main__":
    main()
