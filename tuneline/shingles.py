"""Word n-gram hashes for a whole batch of texts at once, the input of near-dedup and decontamination.

Words are runs of letters and digits (ASCII is lower-cased; any non-ASCII byte counts as a letter),
so punctuation and spacing do not hide a copy. Hashing is vectorized over the batch's UTF-8 bytes
with numpy and does not depend on Python's per-process string hash seed: the same text gives the
same hashes in every run, so near-dedup and decontamination are reproducible.
"""

from __future__ import annotations

import numpy as np

_MASK = np.uint64((1 << 64) - 1)
_BYTE_POWERS = np.array(
    [pow(1_099_511_628_211, k, 1 << 64) for k in range(256)], dtype=np.uint64
)  # FNV prime powers: byte k of a word is weighted by P**k (words longer than 256 bytes wrap)
_NGRAM_MULTIPLIERS = np.array(
    [pow(0x9E3779B97F4A7C15, k + 1, 1 << 64) | 1 for k in range(64)], dtype=np.uint64
)


def _word_byte_mask(data: np.ndarray) -> np.ndarray:
    """True for bytes inside a word: ASCII letters and digits, and every non-ASCII byte."""
    return (
        ((data >= ord("0")) & (data <= ord("9")))
        | ((data >= ord("a")) & (data <= ord("z")))
        | ((data >= ord("A")) & (data <= ord("Z")))
        | (data >= 0x80)
    )


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One uint64 hash per word of every text, flat, and row offsets (`offsets[i]:offsets[i+1]`
    are the words of text i)."""
    encoded = [text.encode("utf-8", "surrogatepass") + b" " for text in texts]
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    text_ends = np.cumsum([len(chunk) for chunk in encoded], dtype=np.int64)
    if data.size == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(len(texts) + 1, dtype=np.int64)
    inside = _word_byte_mask(data)
    lowered = np.where((data >= ord("A")) & (data <= ord("Z")), data | 0x20, data).astype(np.uint64)
    starts = np.flatnonzero(inside & ~np.concatenate(([False], inside[:-1])))
    positions = np.flatnonzero(inside)
    word_of_byte = np.searchsorted(starts, positions, side="right") - 1
    offset_in_word = np.minimum(positions - starts[word_of_byte], 255)
    weighted = (lowered[positions] + np.uint64(1)) * _BYTE_POWERS[offset_in_word]
    hashes = np.add.reduceat(weighted, np.searchsorted(positions, starts)) if starts.size else weighted[:0]
    offsets = np.concatenate(([0], np.searchsorted(starts, text_ends))).astype(np.int64)
    return hashes.astype(np.uint64), offsets


def ngram_hashes(texts: list[str], n: int, short_texts_as_words: bool) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every run of `n` consecutive words of each text (flat) and row offsets.

    A text with fewer than `n` words has no n-gram; with `short_texts_as_words` its words stand
    in (near-dedup still compares short texts), else its row is empty (a short text cannot share
    a long n-gram with anything).
    """
    words, offsets = word_hashes(texts)
    counts = np.diff(offsets)
    if n == 1:
        return words, offsets
    multipliers = _NGRAM_MULTIPLIERS[np.arange(n) % 64]
    total = max(words.size - n + 1, 0)
    combined = np.zeros(total, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            combined += words[k : k + total] * multipliers[k]
    # An n-gram starting at flat position p is valid when it ends inside the same text.
    text_of = np.repeat(np.arange(len(texts)), counts)
    valid = np.zeros(total, dtype=bool)
    if total:
        valid = text_of[:total] == text_of[n - 1 :]
    per_text = np.maximum(counts - n + 1, 0)
    pieces: list[np.ndarray] = []
    new_counts = per_text.copy()
    kept = combined[valid]
    if short_texts_as_words and (counts < n).any():
        cursor = 0
        for index in range(len(texts)):
            if counts[index] >= n:
                pieces.append(kept[cursor : cursor + per_text[index]])
                cursor += per_text[index]
            else:
                pieces.append(words[offsets[index] : offsets[index + 1]])
                new_counts[index] = counts[index]
        flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint64)
    else:
        flat = kept
    return flat.astype(np.uint64), np.concatenate(([0], np.cumsum(new_counts))).astype(np.int64)
