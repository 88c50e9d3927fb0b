"""Served batches waiting for their labels: bounded by count and by bytes, the oldest out first.

An application may label a batch long after it was served, label only some of its samples, in
several messages, in any order, or never. The store keeps each unlabelled batch as
``Learner.serve`` returned it (inputs and every model's predictions), by the application's
``batch_id``, until every sample is labelled or the bounds push it out. Nothing leaves silently:
a batch pushed out before all its samples were labelled counts as expired (batches and samples),
and labels that come for it later are refused as expired, not as unknown.

No MQTT: the daemon and the simulator's in-process fleet both learn late labels through ``learn``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from agent.learner import BatchResult, Learner, Served

#: How many finished (expired or fully labelled) batch ids are remembered, to say why their labels are refused.
REMEMBERED_IDS = 4096


class LabelsRefused(ValueError):
    """Labels that cannot be used: an unknown, expired or finished batch, or samples labelled before."""


@dataclass
class _Entry:
    served: Served
    labelled: np.ndarray
    nbytes: int


class ServedStore:
    """Unlabelled served batches by ``batch_id``, at most ``max_batches`` of them and ``max_bytes`` in all."""

    def __init__(self, max_batches: int, max_bytes: int) -> None:
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._gone: OrderedDict[int, str] = OrderedDict()
        self.nbytes = 0
        #: Batches pushed out before every sample was labelled, and their unlabelled samples.
        self.expired_batches = 0
        self.expired_samples = 0
        self.resize(max_batches, max_bytes)

    def resize(self, max_batches: int, max_bytes: int) -> list[int]:
        """New bounds; returns the ids of batches they push out (expired)."""
        if max_batches < 0 or max_bytes < 0:
            raise ValueError("the served-batch store's bounds must be >= 0")
        self.max_batches, self.max_bytes = max_batches, max_bytes
        return self._evict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, batch_id: int) -> bool:
        return batch_id in self._entries

    def put(self, batch_id: int, served: Served) -> list[int]:
        """Keep ``served`` until its labels come; returns the ids of batches this pushed out.

        A batch id still waiting replaces the older batch, which expires: labels name one batch.
        """
        expired = []
        if batch_id in self._entries:
            self._expire(batch_id)
            expired.append(batch_id)
        n = served.x.shape[0]
        entry = _Entry(served, np.zeros(n, dtype=bool), served.nbytes + n)
        self._entries[batch_id] = entry
        self._gone.pop(batch_id, None)
        self.nbytes += entry.nbytes
        return expired + self._evict()

    def lookup(self, batch_id: int, count: int, indices: np.ndarray | None) -> Served:
        """The served batch ``count`` labels for ``indices`` (None: every sample) may label; raises
        LabelsRefused, changing nothing. The labels' own checks (shape, range) are the learner's."""
        entry = self._entries.get(batch_id)
        if entry is None:
            why = self._gone.get(batch_id)
            if why == "expired":
                raise LabelsRefused(f"batch {batch_id} expired from the served-batch store before these labels came")
            if why == "labelled":
                raise LabelsRefused(f"every sample of batch {batch_id} is labelled already")
            raise LabelsRefused(f"batch {batch_id} is unknown: it was never served unlabelled, or too long ago to remember")
        n = entry.labelled.shape[0]
        if indices is None:
            if count != n:
                raise LabelsRefused(f"{count} labels for batch {batch_id} of {n} samples (name the samples by index to label some)")
            if entry.labelled.any():
                raise LabelsRefused(
                    f"{int(entry.labelled.sum())} samples of batch {batch_id} are labelled already: name the others by index"
                )
            return entry.served
        if indices.ndim != 1 or indices.shape[0] != count:
            raise LabelsRefused(f"{count} labels for {indices.size} indices")
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise LabelsRefused(f"indices of batch {batch_id} must be in [0, {n})")
        twice = np.flatnonzero(entry.labelled[indices])
        if twice.size:
            raise LabelsRefused(f"samples {indices[twice][:8].tolist()} of batch {batch_id} are labelled already")
        return entry.served

    def learn(self, learner: Learner, batch_id: int, y: np.ndarray, indices: np.ndarray | None) -> tuple[BatchResult, int]:
        """``learner`` learns labels ``y`` of waiting batch ``batch_id`` (``indices``: which samples;
        None: all) as if they had come with it; the result and the samples still unlabelled.

        Raises LabelsRefused, or the learner's ValueError for labels that do not fit, changing nothing.
        """
        served = self.lookup(batch_id, len(y), indices)
        result = learner.learn(served, torch.from_numpy(y), None if indices is None else torch.from_numpy(indices))
        entry = self._entries[batch_id]
        return result, 0 if self.mark(batch_id, indices) else int((~entry.labelled).sum())

    def mark(self, batch_id: int, indices: np.ndarray | None) -> bool:
        """Record that ``indices`` (None: all) of ``batch_id`` were labelled; True when that was its last."""
        entry = self._entries[batch_id]
        if indices is None:
            entry.labelled[:] = True
        else:
            entry.labelled[indices] = True
        if not entry.labelled.all():
            return False
        del self._entries[batch_id]
        self.nbytes -= entry.nbytes
        self._remember(batch_id, "labelled")
        return True

    def _evict(self) -> list[int]:
        out = []
        while self._entries and (len(self._entries) > self.max_batches or self.nbytes > self.max_bytes):
            batch_id = next(iter(self._entries))
            self._expire(batch_id)
            out.append(batch_id)
        return out

    def _expire(self, batch_id: int) -> None:
        entry = self._entries.pop(batch_id)
        self.nbytes -= entry.nbytes
        self.expired_batches += 1
        self.expired_samples += int((~entry.labelled).sum())
        self._remember(batch_id, "expired")

    def _remember(self, batch_id: int, why: str) -> None:
        self._gone[batch_id] = why
        self._gone.move_to_end(batch_id)
        while len(self._gone) > REMEMBERED_IDS:
            self._gone.popitem(last=False)
