"""Word n-gram hashes for a whole batch of texts at once, the input of near-dedup and decontamination.

Words are runs of letters and digits (ASCII is lower-cased; any non-ASCII byte counts as a letter),
so punctuation and spacing do not hide a copy. Hashing is vectorized over the batch's UTF-8 bytes
with numpy and does not depend on Python's per-process string hash seed: the same text gives the
same hashes in every run, so near-dedup and decontamination are reproducible.
"""

from __future__ import annotations

import numpy as np

CHUNK_BYTES = 1 << 21  # texts are hashed ~2 MB at a time: a few arrays of 8 bytes per byte each
_PRIME = 1_099_511_628_211  # FNV-64 prime: odd, so it has an inverse modulo 2**64
_PRIME_INVERSE = pow(_PRIME, -1, 1 << 64)
_NGRAM_MULTIPLIERS = np.array(
    [pow(0x9E3779B97F4A7C15, k + 1, 1 << 64) | 1 for k in range(64)], dtype=np.uint64
)


def _byte_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per byte value: whether it is inside a word (ASCII letters and digits, any non-ASCII byte),
    and its hash value (ASCII lower-cased, plus one so that no byte weighs zero)."""
    codes = np.arange(256)
    inside = (
        ((codes >= ord("0")) & (codes <= ord("9")))
        | ((codes >= ord("a")) & (codes <= ord("z")))
        | ((codes >= ord("A")) & (codes <= ord("Z")))
        | (codes >= 0x80)
    )
    lowered = np.where((codes >= ord("A")) & (codes <= ord("Z")), codes | 0x20, codes)
    return inside, (lowered + 1).astype(np.uint64)


_INSIDE_WORD, _BYTE_VALUE = _byte_tables()


def _powers(base: int, size: int) -> np.ndarray:
    powers = np.full(size, base, dtype=np.uint64)
    powers[0] = 1
    return np.cumprod(powers, dtype=np.uint64)  # wraps modulo 2**64, as the hash wants


_POWERS = _powers(_PRIME, CHUNK_BYTES + 1)
_INVERSE_POWERS = _powers(_PRIME_INVERSE, CHUNK_BYTES + 1)


def _chunk_word_hashes(encoded: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Word hashes of a few texts: a polynomial hash of each word's bytes, from prefix sums
    (hash(word) = (H[end] - H[start]) * P**-start), with no Python loop over words."""
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    powers, inverse = (
        (_POWERS, _INVERSE_POWERS)
        if data.size <= CHUNK_BYTES
        else (_powers(_PRIME, data.size + 1), _powers(_PRIME_INVERSE, data.size + 1))
    )  # a single text longer than a chunk gets its own tables
    text_ends = np.cumsum([len(chunk) for chunk in encoded], dtype=np.int64)
    inside = _INSIDE_WORD[data]
    edges = np.diff(inside.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    with np.errstate(over="ignore"):
        prefix = np.zeros(data.size + 1, dtype=np.uint64)
        np.cumsum(_BYTE_VALUE[data] * powers[: data.size], dtype=np.uint64, out=prefix[1:])
        hashes = (prefix[ends] - prefix[starts]) * inverse[starts]
    offsets = np.concatenate(([0], np.searchsorted(starts, text_ends))).astype(np.int64)
    return hashes.astype(np.uint64), offsets


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One uint64 hash per word of every text, flat, and row offsets (`offsets[i]:offsets[i+1]`
    are the words of text i)."""
    encoded = [text.encode("utf-8", "surrogatepass") + b" " for text in texts]
    parts, offsets, chunk, size, base = [], [np.zeros(1, dtype=np.int64)], [], 0, 0
    for item in [*encoded, None]:
        if chunk and (item is None or size + len(item) > CHUNK_BYTES):
            hashes, chunk_offsets = _chunk_word_hashes(chunk)
            parts.append(hashes)
            offsets.append(chunk_offsets[1:] + base)
            base += hashes.size
            chunk, size = [], 0
        if item is not None:
            chunk.append(item)
            size += len(item)
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
    return flat, np.concatenate(offsets)


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
    combined = np.zeros(words.size, dtype=np.uint64)  # combined[p]: the n-gram starting at word p
    with np.errstate(over="ignore"):
        for k in range(n):
            combined[:total] += words[k : k + total] * multipliers[k]
    # An n-gram starting at flat position p is valid when it ends inside the same text; positions
    # stay sorted, so selecting them keeps each text's n-grams together and in order.
    text_of = np.repeat(np.arange(len(texts)), counts)
    valid = np.zeros(words.size, dtype=bool)
    valid[:total] = text_of[:total] == text_of[n - 1 :]
    selected = valid
    if short_texts_as_words:
        short_word = (counts < n)[text_of]
        selected = valid | short_word
        combined = np.where(short_word, words, combined)
    per_text = np.bincount(text_of[selected], minlength=len(texts))
    return combined[selected], np.concatenate(([0], np.cumsum(per_text))).astype(np.int64)
