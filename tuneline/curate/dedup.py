"""Near-duplicate detection with MinHash LSH, streamed batch by batch, first occurrence kept.

Signatures come from rensa (Rust MinHash over the batch's token n-gram hashes, see
`tuneline.curate.shingles`: words, or single characters in Chinese, Japanese, Korean, Thai...).
The LSH index is a set of band hashes: a record whose band collides with a band of any earlier
kept record is a near duplicate. Bands and rows per band are chosen so that the S-curve's
midpoint `(1/bands)**(1/rows)` sits at the recipe's threshold. Memory grows with the number of
kept records times bands (about 8 ints per record), not with their text.
"""

from __future__ import annotations

import numpy as np
import rensa

from tuneline.curate.shingles import ngram_hashes

SEED = 1
# Near-dedup shingles are n single characters in Chinese, Japanese, Korean, Thai: a one-character
# edit then changes as few shingles as a one-word edit in English (bench/near_dedup_languages.py:
# 91% of such edits found in alpaca_zh_demo against 80% in English; 78% with 2 characters a word),
# and the similarity threshold, not the shingle length, keeps distinct texts apart.
CHARACTERS_PER_WORD = 1


def choose_bands(num_perm: int, threshold: float) -> int:
    """Number of LSH bands (dividing num_perm) whose S-curve midpoint is closest to threshold."""
    divisors = [b for b in range(1, num_perm + 1) if num_perm % b == 0]
    return min(divisors, key=lambda b: abs((1 / b) ** (b / num_perm) - threshold))


def signatures(texts: list[str], ngram: int, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures (rows x num_perm, uint64) and whether each text had any words."""
    hashes, offsets = ngram_hashes(texts, ngram, True, CHARACTERS_PER_WORD)
    has_words = np.diff(offsets) > 0
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
        hashes, offsets.astype(np.uint64), num_perm, SEED
    )
    rows = np.array(matrix.to_rows(), dtype=np.uint64).reshape(len(texts), num_perm)
    return rows, has_words


def band_hashes(rows: np.ndarray, bands: int) -> np.ndarray:
    """One uint64 per (record, band): the band's rows folded together, tagged with the band index."""
    n, num_perm = rows.shape
    per_band = num_perm // bands
    grouped = rows.reshape(n, bands, per_band)
    folded = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(per_band):
            folded = folded * np.uint64(0x100000001B3) + grouped[:, :, k]
        folded ^= np.arange(bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return folded


def lsh_keys(texts: list[str], ngram: int, num_perm: int, bands: int) -> list[list[int] | None]:
    """Each text's LSH band hashes, or None for a text without words (never a near duplicate).
    Pure and picklable: clean computes it in worker processes."""
    if not texts:
        return []
    rows, has_words = signatures(texts, ngram, num_perm)
    return [
        keys if words else None
        for keys, words in zip(band_hashes(rows, bands).tolist(), has_words, strict=True)
    ]


class NearDedup:
    """Streaming near-dedup: `flags(texts)` marks each text that is near an earlier kept one."""

    def __init__(self, threshold: float, ngram: int, num_perm: int) -> None:
        self.ngram = ngram
        self.num_perm = num_perm
        self.bands = choose_bands(num_perm, threshold)
        self.seen: set[int] = set()

    def keys(self, texts: list[str]) -> list[list[int] | None]:
        return lsh_keys(texts, self.ngram, self.num_perm, self.bands)

    def flags(self, texts: list[str], candidates: list[bool] | None = None) -> list[bool]:
        """True for each text near a text kept before it (in earlier batches or this one).
        Texts whose candidate flag is False (already dropped) are neither checked nor indexed."""
        return self.flags_from_keys(self.keys(texts), candidates)

    def flags_from_keys(
        self, keys: list[list[int] | None], candidates: list[bool] | None = None
    ) -> list[bool]:
        result = []
        seen = self.seen
        for index, bands in enumerate(keys):
            if bands is None or (candidates is not None and not candidates[index]):
                result.append(False)
            elif any(key in seen for key in bands):
                result.append(True)
            else:
                seen.update(bands)
                result.append(False)
        return result


def near_duplicate_pairs(
    texts: list[str], threshold: float, ngram: int, num_perm: int
) -> list[tuple[int, int, float]]:
    """Every (earlier, later, estimated Jaccard) pair of texts sharing an LSH band whose signature
    similarity reaches the threshold: what a person reviews to tune `near_dedup_threshold`."""
    rows, has_words = signatures(texts, ngram, num_perm)
    bands = band_hashes(rows, choose_bands(num_perm, threshold))
    first: dict[int, list[int]] = {}
    pairs: set[tuple[int, int]] = set()
    for index, keys in enumerate(bands.tolist()):
        if not has_words[index]:
            continue
        for key in keys:
            bucket = first.setdefault(key, [])
            pairs.update((earlier, index) for earlier in bucket[:20])
            bucket.append(index)
    found = []
    for earlier, later in sorted(pairs):
        similarity = float(np.mean(rows[earlier] == rows[later]))
        if similarity >= threshold:
            found.append((earlier, later, similarity))
    return found
