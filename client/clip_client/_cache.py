"""The prompt cache: raw (unnormalised) text embeddings keyed by prompt, least recently used evicted first."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import ops
from .errors import InvalidInputError, InvalidResponseError
from .inputs import normalize_texts


@dataclass
class PromptJob:
    """The prompts of one class_embeddings call: which embeddings the cache had, which must be encoded."""

    prompts: list[str]  # class-major: C classes x T templates
    n_classes: int
    n_templates: int
    known: dict[str, np.ndarray] = field(default_factory=dict)  # prompt -> raw embedding, from the cache
    missing: list[str] = field(default_factory=list)  # to encode, de-duplicated, in first-seen order


def check_classes(class_texts: Any) -> list[str]:
    """class_texts -> list[str], non-empty."""
    classes = normalize_texts(class_texts)
    if not classes:
        raise InvalidInputError("class_texts must hold at least one class")
    return classes


class PromptCache:
    """Thread-safe LRU of prompt -> raw text embedding (shared by the threads of CLIPClient and the tasks of
    AsyncCLIPClient)."""

    def __init__(self, size: int):
        self.size = int(size)
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def job(self, class_texts: Any, templates: str | list[str] | None) -> PromptJob:
        """The prompts of class_texts x templates, with the embeddings the cache already holds for them."""
        classes = check_classes(class_texts)
        templates = [templates] if isinstance(templates, str) else templates
        prompts = normalize_texts(ops.expand_templates(classes, templates))  # each checked before any request
        known: dict[str, np.ndarray] = {}
        with self._lock:
            for p in prompts:
                if p not in known and p in self._items:
                    known[p] = self._items[p]
                    self._items.move_to_end(p)  # least recently used goes first
        missing = list(OrderedDict.fromkeys(p for p in prompts if p not in known))  # de-duplicated, first-seen
        return PromptJob(prompts, len(classes), max(1, len(templates or [])), known, missing)

    def store(self, prompts: list[str], embeds: np.ndarray) -> None:
        with self._lock:
            for p, e in zip(prompts, embeds):
                self._items[p] = e
                self._items.move_to_end(p)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def class_matrix(self, job: PromptJob, encoded: np.ndarray | None) -> np.ndarray:
        """Normalised class embeddings (C, D) from the job's cached embeddings and `encoded` (job.missing's, raw).

        Built from the job's own embeddings, never read back from the cache: the cache may be smaller than the
        number of prompts, and other threads may evict entries meanwhile.
        """
        embeds = dict(job.known)
        if job.missing:
            if encoded is None or len(encoded) != len(job.missing):
                raise InvalidResponseError("encode_text answered a different number of embeddings than prompts sent")
            embeds.update(zip(job.missing, encoded))
            self.store(job.missing, encoded)
        raw = np.stack([embeds[p] for p in job.prompts])  # (C*T, D)
        return ops.class_embeddings(raw, job.n_classes, job.n_templates)  # (C, D)
