"""Exact and near-duplicate texts, for removing repeated instructions.

- `canonical_text(text)`: casefolded NFKC words joined by single spaces; equal keys are exact
  duplicates (they differ at most in case, punctuation and spacing).
- `shingles(text, size)`: the set of word n-grams of the canonical text.
- `jaccard(a, b)`: |a & b| / |a | b|.
- `near_duplicate_pairs(texts, threshold, size)`: every pair (i, j, jaccard), i < j, whose
  shingle sets have Jaccard similarity >= threshold.

Why this method: word n-gram shingles with Jaccard similarity (Broder 1997) is the standard
measure for near-duplicate text; it sees a copy with a few words edited as close and two
instructions that share only a template ("What is the capital of ...") as different. Comparing
every pair is quadratic (1.5e9 pairs for Alpaca's 52k rows), so candidate pairs come from MinHash
signatures cut into LSH bands, the bands sized from the threshold so that a pair at the threshold
is missed with probability below `MISS_RATE`; every candidate is then confirmed with its exact
Jaccard, so no pair below the threshold is ever reported. This takes a few dozen lines of NumPy,
which is why the `datasketch` library was not added as a dependency.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

SIGNATURE_SIZE = 128
MISS_RATE = 1e-3
WORD = re.compile(r"\w+")


def canonical_text(text: str) -> str:
    return " ".join(WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


def shingles(text: str, size: int = 3) -> frozenset[str]:
    words = canonical_text(text).split()
    if len(words) <= size:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i:i + size]) for i in range(len(words) - size + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def band_rows(threshold: float, signature_size: int = SIGNATURE_SIZE, miss_rate: float = MISS_RATE) -> int:
    """Rows per LSH band: the most (fewest false candidates) that still find a pair at the
    threshold with probability 1 - miss_rate; a pair is found when any band matches entirely."""
    best = 1
    for rows in range(1, signature_size + 1):
        bands = signature_size // rows
        if 1 - (1 - threshold ** rows) ** bands >= 1 - miss_rate:
            best = rows
    return best


def minhash_signatures(sets: Sequence[frozenset[str]], signature_size: int = SIGNATURE_SIZE,
                       seed: int = 0) -> np.ndarray:
    """signature[i, k] = min over the shingles of set i of the k-th hash function.

    The k-th function is multiply-add-shift hashing of 32-bit keys with 64-bit arithmetic
    (Dietzfelbinger 1996), which is 2-independent; its top 32 bits are the value.
    """
    rng = np.random.default_rng(seed)
    multipliers = rng.integers(1, 2 ** 63, size=signature_size, dtype=np.uint64) | np.uint64(1)
    offsets = rng.integers(0, 2 ** 63, size=signature_size, dtype=np.uint64)
    signatures = np.full((len(sets), signature_size), np.iinfo(np.uint64).max, dtype=np.uint64)
    for index, members in enumerate(sets):
        if not members:
            continue
        keys = np.fromiter((int.from_bytes(hashlib.blake2b(m.encode(), digest_size=4).digest(), "little")
                            for m in members), dtype=np.uint64, count=len(members))
        with np.errstate(over="ignore"):
            hashed = (multipliers[:, None] * keys[None, :] + offsets[:, None]) >> np.uint64(32)
        signatures[index] = hashed.min(axis=1)
    return signatures


def near_duplicate_pairs(texts: Sequence[str], threshold: float = 0.8, size: int = 3,
                         seed: int = 0) -> list[tuple[int, int, float]]:
    sets = [shingles(text, size) for text in texts]
    signatures = minhash_signatures(sets, seed=seed)
    rows = band_rows(threshold)
    candidates: set[tuple[int, int]] = set()
    for start in range(0, SIGNATURE_SIZE - rows + 1, rows):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for index in range(len(sets)):
            if sets[index]:
                buckets[signatures[index, start:start + rows].tobytes()].append(index)
        for members in buckets.values():
            candidates.update((a, b) for i, a in enumerate(members) for b in members[i + 1:])
    pairs = [(a, b, jaccard(sets[a], sets[b])) for a, b in sorted(candidates)]
    return [(a, b, similarity) for a, b, similarity in pairs if similarity >= threshold]
