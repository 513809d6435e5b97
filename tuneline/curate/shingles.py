"""Token n-gram hashes for a whole batch of texts at once, the input of near-dedup and decontamination.

Tokens are words where a script separates words with spaces and single characters where it does
not. A word is a run of ASCII letters and digits (lower-cased) and of non-ASCII characters, so
punctuation and spacing do not hide a copy. Each character of Han, Hiragana, Katakana, Hangul,
Thai, Lao, Khmer and Myanmar (found by Unicode script with `regex`) is a token of its own, and
those scripts' punctuation (、。「」，！ ...) separates like ASCII punctuation: a one-character edit
in Chinese then changes n shingles, as a one-word edit does in English, instead of the whole
sentence. Hangul is split too although Korean uses spaces: its particles and endings are glued to
the word, so a changed ending would otherwise change the whole word. Mixed text (Chinese with
English words or code) gives both kinds of tokens in order; text without those scripts gives the
same tokens, hence the same hashes, as before.

Hashing is vectorized over the batch's UTF-8 bytes with numpy and does not depend on Python's
per-process string hash seed: the same text gives the same hashes in every run, so near-dedup and
decontamination are reproducible.
"""

from __future__ import annotations

from functools import cache

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


# Scripts written without spaces between words (and Hangul, see above): one token per character.
# U+30FC and U+FF70 (the prolonged sound mark ー) are script Common but only occur in kana words.
_CHARACTER_TOKENS = (
    r"[\p{sc=Han}\p{sc=Hiragana}\p{sc=Katakana}\p{sc=Hangul}"
    r"\p{sc=Thai}\p{sc=Lao}\p{sc=Khmer}\p{sc=Myanmar}\u30fc\uff70]"
)
# Their punctuation, and the CJK and fullwidth punctuation blocks, separate tokens. Punctuation
# elsewhere (curly quotes, dashes) stays part of a word as before, so English shingles do not move.
_SEPARATORS = (
    r"[[\p{P}\p{S}\p{Z}]&&[\u3000-\u303f\u30fb\ufe10-\ufe1f\ufe30-\ufe6f\uff00-\uffef"
    r"\p{sc=Thai}\p{sc=Lao}\p{sc=Khmer}\p{sc=Myanmar}]]"
)
# Their combining vowel and tone marks stay with the character before them (one grapheme).
_MARKS = r"[\p{M}&&[\p{sc=Thai}\p{sc=Lao}\p{sc=Khmer}\p{sc=Myanmar}]]"
_WORD, _SEPARATOR, _CHARACTER, _MARK = 0, 1, 2, 3
_TABLE_SIZE = 0x40000  # through the Supplementary and Tertiary Ideographic Planes (all Han)


@cache
def _code_point_classes() -> np.ndarray:
    """Per non-ASCII code point below _TABLE_SIZE: word character, separator, character token or
    combining mark.
    Built on first use (~0.2 s), not at import, so commands that never hash do not pay for it."""
    import regex

    text = "".join(map(chr, range(_TABLE_SIZE)))  # position i holds code point i
    classes = np.full(_TABLE_SIZE, _WORD, dtype=np.uint8)
    for pattern, value in ((_CHARACTER_TOKENS, _CHARACTER), (_MARKS, _MARK), (_SEPARATORS, _SEPARATOR)):
        found = [m.start() for m in regex.finditer(pattern, text, flags=regex.V1)]
        classes[np.array(found, dtype=np.int64)] = value
    return classes


def _powers(base: int, size: int) -> np.ndarray:
    powers = np.full(size, base, dtype=np.uint64)
    powers[0] = 1
    return np.cumprod(powers, dtype=np.uint64)  # wraps modulo 2**64, as the hash wants


_POWERS = _powers(_PRIME, CHUNK_BYTES + 1)
_INVERSE_POWERS = _powers(_PRIME_INVERSE, CHUNK_BYTES + 1)


def _token_bounds(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte offsets where each token starts and ends (exclusive), in order, and whether each
    token is a character token."""
    inside = _INSIDE_WORD[data]
    leads = np.flatnonzero(data >= 0xC0)  # first bytes of multi-byte characters
    if leads.size:
        classes, lengths = _lead_classes(data, leads)
        for k in range(4):  # a separator's bytes are outside every token
            separator = (classes == _SEPARATOR) & (lengths > k)
            inside[leads[separator] + k] = False
        single = classes >= _CHARACTER
        if single.any():  # a token ends before and after each character token and its marks
            cut = np.zeros(data.size + 1, dtype=bool)
            cut[leads[single]] = True
            cut[leads[single] + lengths[single]] = True
            cut[leads[classes == _MARK]] = False
            before = np.concatenate(([False], inside))  # before[i]: byte i - 1 is inside
            after = np.concatenate((inside, [False]))  # after[i]: byte i is inside
            starts = np.flatnonzero(after & (~before | cut))
            character = np.zeros(data.size + 1, dtype=bool)
            character[leads[single]] = True
            return starts, np.flatnonzero(before & (~after | cut)), character[starts]
    edges = np.diff(inside.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    return starts, np.flatnonzero(edges == -1), np.zeros(starts.size, dtype=bool)


def _lead_classes(data: np.ndarray, leads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The class (word, separator, character token) and byte length of each multi-byte
    character, from its decoded code point."""
    padded = np.concatenate((data, np.zeros(3, dtype=np.uint8)))
    first = padded[leads].astype(np.int64)
    lengths = 2 + (first >= 0xE0) + (first >= 0xF0)
    code = first & (0xFF >> (lengths + 1))
    for k in range(1, 4):
        following = padded[leads + k].astype(np.int64) & 0x3F
        code = np.where(lengths > k, (code << 6) | following, code)
    table = _code_point_classes()
    classes = np.where(code < _TABLE_SIZE, table[np.minimum(code, _TABLE_SIZE - 1)], _WORD)
    return classes, lengths


def _chunk_token_hashes(encoded: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token hashes of a few texts: a polynomial hash of each token's bytes, from prefix sums
    (hash(token) = (H[end] - H[start]) * P**-start), with no Python loop over tokens; whether
    each is a character token; row offsets."""
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    powers, inverse = (
        (_POWERS, _INVERSE_POWERS)
        if data.size <= CHUNK_BYTES
        else (_powers(_PRIME, data.size + 1), _powers(_PRIME_INVERSE, data.size + 1))
    )  # a single text longer than a chunk gets its own tables
    text_ends = np.cumsum([len(chunk) for chunk in encoded], dtype=np.int64)
    starts, ends, characters = _token_bounds(data)
    with np.errstate(over="ignore"):
        prefix = np.zeros(data.size + 1, dtype=np.uint64)
        np.cumsum(_BYTE_VALUE[data] * powers[: data.size], dtype=np.uint64, out=prefix[1:])
        hashes = (prefix[ends] - prefix[starts]) * inverse[starts]
    offsets = np.concatenate(([0], np.searchsorted(starts, text_ends))).astype(np.int64)
    return hashes.astype(np.uint64), characters, offsets


def token_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One uint64 hash per token of every text, flat; whether each token is a character (of a
    script written without spaces); row offsets (`offsets[i]:offsets[i+1]` are text i's tokens)."""
    encoded = [text.encode("utf-8", "surrogatepass") + b" " for text in texts]
    parts, flags, offsets, chunk, size, base = [], [], [np.zeros(1, dtype=np.int64)], [], 0, 0
    for item in [*encoded, None]:
        if chunk and (item is None or size + len(item) > CHUNK_BYTES):
            hashes, characters, chunk_offsets = _chunk_token_hashes(chunk)
            parts.append(hashes)
            flags.append(characters)
            offsets.append(chunk_offsets[1:] + base)
            base += hashes.size
            chunk, size = [], 0
        if item is not None:
            chunk.append(item)
            size += len(item)
    if not parts:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=bool), np.concatenate(offsets)
    return np.concatenate(parts), np.concatenate(flags), np.concatenate(offsets)


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One uint64 hash per token (word or character) of every text, flat, and row offsets."""
    hashes, _, offsets = token_hashes(texts)
    return hashes, offsets


def _long_windows(characters: np.ndarray, n: int, per_word: int) -> tuple[np.ndarray, np.ndarray]:
    """The positions whose n-gram needs more than n tokens, and how many: `per_word` characters
    weigh one word, so a window holding characters grows until it weighs n words. Only windows
    near a character are looked at, so text of words costs nothing here. A window may run past
    the last token (counted as words); the caller keeps only windows inside their text."""
    chars = np.flatnonzero(characters)
    near = np.zeros(characters.size + n, dtype=bool)
    for back in range(n):  # windows starting up to n - 1 tokens before a character hold it
        near[chars + n - 1 - back] = True
    positions = np.flatnonzero(near[n - 1 : n - 1 + characters.size])
    lengths = np.full(positions.size, n, dtype=np.int64)
    growing = np.arange(positions.size)
    while growing.size:  # one token at a time, only for the windows still too light
        start, stop = positions[growing], positions[growing] + lengths[growing]
        held = np.searchsorted(chars, stop) - np.searchsorted(chars, start)
        light = per_word * lengths[growing] - (per_word - 1) * held < per_word * n
        growing = growing[light]
        lengths[growing] += 1
    longer = lengths > n
    return positions[longer], lengths[longer]


def ngram_hashes(
    texts: list[str], n: int, short_texts_as_words: bool, characters_per_word: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every run of `n` consecutive words of each text (flat) and row offsets. Where a
    run holds characters of scripts written without spaces, `characters_per_word` of them weigh
    one word (2: an n-gram spans about as much Chinese text as n words of English; 1: each
    character is a word, finer shingles).

    A text too short for one n-gram has none; with `short_texts_as_words` its tokens stand in
    (near-dedup still compares short texts), else its row is empty (a short text cannot share a
    long n-gram with anything).
    """
    tokens, characters, offsets = token_hashes(texts)
    if n == 1:
        return tokens, offsets
    size = tokens.size
    longer, longer_lengths = _long_windows(characters, n, characters_per_word)
    combined = np.zeros(size, dtype=np.uint64)  # combined[p]: the n-gram starting at token p
    total = max(size - n + 1, 0)
    with np.errstate(over="ignore"):
        for k in range(n):
            combined[:total] += tokens[k : k + total] * _NGRAM_MULTIPLIERS[k % 64]
        growing = np.flatnonzero(longer + n < size)  # windows holding characters hold more tokens
        for k in range(n, int(longer_lengths.max(initial=0))):
            growing = growing[(longer_lengths[growing] > k) & (longer[growing] + k < size)]
            combined[longer[growing]] += tokens[longer[growing] + k] * _NGRAM_MULTIPLIERS[k % 64]
    # An n-gram starting at flat position p is valid when it ends inside the same text; positions
    # stay sorted, so selecting them keeps each text's n-grams together and in order.
    text_of = np.repeat(np.arange(len(texts)), np.diff(offsets))
    valid = np.zeros(size, dtype=bool)
    valid[:total] = text_of[:total] == text_of[n - 1 :]
    last = longer + longer_lengths - 1
    valid[longer] = (last < size) & (text_of[np.minimum(last, size - 1)] == text_of[longer])
    selected = valid
    if short_texts_as_words:
        counts = np.diff(offsets)
        weight = characters_per_word * counts - (characters_per_word - 1) * np.bincount(
            text_of[characters], minlength=len(texts)
        )
        short = (weight < characters_per_word * n)[text_of]  # too short for one n-gram
        selected = valid | short
        combined = np.where(short, tokens, combined)
    per_text = np.bincount(text_of[selected], minlength=len(texts))
    return combined[selected], np.concatenate(([0], np.cumsum(per_text))).astype(np.int64)
