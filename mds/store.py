"""The MdS's node table: SQLite (WAL) on disk, one histogram matrix per (arch, lineage) in memory.

Every write goes to SQLite first and then to an in-memory cache; a query reads only the cache, so
it costs a few vectorised passes over one matrix and never touches the disk. The cache groups
nodes by `(arch_id, lineage)`: a helper must share both with the asker, so picking the group *is*
that part of the eligibility rule, and every node of a group has histograms of the same width C
(the architecture fixes the number of classes). Rows grow by doubling (amortised O(1) per new
node); a removed node's row is filled with the group's last row.

A node is *online* only after an `online` status: a node known from its metadata alone counts as
offline. Status may arrive before metadata (retained messages of different topics come in any
order), so a node can have a row without metadata; such a node is never a helper.

A node's metadata is replaced by each `upsert_meta` call, in the order the caller received it: the
sender's `ts` is stored (`meta_ts`) and never compared. A sender's clock may be wrong or forged:
were stamps compared, one message stamped in the future would pin a node's row (every later one
would look older, even after a restart from the file) and a clock stepped back would hide its
updates. So a row that an older version wrote with a future stamp loads like any other.

>>> from broker.wire import NodeMeta
>>> store = NodeStore(":memory:")
>>> for node, hist in [("a", [9, 1, 0]), ("b", [1, 1, 8]), ("c", [8, 2, 0])]:
...     _ = store.upsert_meta(NodeMeta(node_id=node, arch_id="mlp", lineage="b0", hist=hist))
...     _ = store.set_online(node, True)
>>> [m.node_id for m in store.query("a", "mlp", "b0", [1], [9, 1, 0], k=2)]
['c', 'b']
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from broker import topics
from broker.wire import NodeMeta
from mds.similarity import OF_DISTRIBUTIONS, SIMILARITIES, best_rows, row_norms

log = logging.getLogger(__name__)

#: Widest class histogram accepted (the wire's bound too).
MAX_CLASSES = 4096
SCHEMA_VERSION = 1
_HIST_DTYPE = np.dtype("<f8")
_INITIAL_ROWS = 8

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id       TEXT PRIMARY KEY,
    arch_id       TEXT,
    lineage       TEXT,
    hist          BLOB,
    rolling_error REAL,
    batches       INTEGER NOT NULL DEFAULT 0,
    helpers       INTEGER NOT NULL DEFAULT 0,
    online        INTEGER NOT NULL DEFAULT 0,
    updated_at    REAL NOT NULL,
    meta_ts       REAL
)
"""
_COLUMNS = "node_id, arch_id, lineage, hist, rolling_error, batches, helpers, online, updated_at, meta_ts"


_COVERS = ("all", "any", "none")
_RANKS = ("most_similar", "least_similar")


class Match(NamedTuple):
    """One helper candidate: its id, its similarity to the asker, the requested classes it holds."""

    node_id: str
    score: float
    classes: tuple[int, ...]


class QueryRejected(ValueError):
    """A helper query that cannot be answered; `code` is an `ErrorReply` code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class NodeRecord:
    """One row of the node table. `arch_id`, `lineage`, `hist`, `meta_ts` are None until metadata
    arrived; `hist` is (C,) float64."""

    node_id: str
    arch_id: str | None
    lineage: str | None
    hist: np.ndarray | None
    rolling_error: float | None
    batches: int
    helpers: int
    online: bool
    updated_at: float
    meta_ts: float | None


@dataclass(frozen=True)
class Snapshot:
    """Copies of the cached arrays, in the shapes `mds.similarity` takes: `node_ids`, `arch_ids`,
    `lineages` (N,) object; `online` (N,) bool; `hists` (N, C) float64."""

    node_ids: np.ndarray
    online: np.ndarray
    arch_ids: np.ndarray
    lineages: np.ndarray
    hists: np.ndarray


@dataclass
class _NodeState:
    online: bool
    group: tuple[str, str] | None


class _Group:
    """The nodes of one (arch_id, lineage): ids, histograms (rows of width C), totals, online.

    Each row's distribution and its norm are kept beside the counts, so a query normalises only
    its own histogram and scores every row in one pass.
    """

    def __init__(self, n_classes: int) -> None:
        self.ids: list[str] = []
        self.rows: dict[str, int] = {}
        # Column-major: a query reads the requested classes' columns of every row, not whole rows.
        self.hists = np.zeros((_INITIAL_ROWS, n_classes), order="F")
        self.dists = np.zeros((_INITIAL_ROWS, n_classes))
        self.norms = np.zeros(_INITIAL_ROWS)
        self.totals = np.zeros(_INITIAL_ROWS)
        self.online = np.zeros(_INITIAL_ROWS, dtype=bool)

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def n_classes(self) -> int:
        return self.hists.shape[1]

    def put(self, node_id: str, hist: np.ndarray, online: bool) -> None:
        row = self.rows.get(node_id)
        if row is None:
            row = len(self.ids)
            if row == self.hists.shape[0]:
                self._grow()
            self.ids.append(node_id)
            self.rows[node_id] = row
        self.hists[row] = hist
        self.totals[row] = hist.sum()
        self.dists[row] = hist / self.totals[row] if self.totals[row] > 0 else 0.0
        self.norms[row] = row_norms(self.dists[row : row + 1])[0]
        self.online[row] = online

    def set_online(self, node_id: str, online: bool) -> None:
        self.online[self.rows[node_id]] = online

    def drop(self, node_id: str) -> None:
        row = self.rows.pop(node_id)
        last = len(self.ids) - 1
        if row != last:
            moved = self.ids[last]
            self.ids[row] = moved
            self.rows[moved] = row
            self.hists[row] = self.hists[last]
            self.dists[row] = self.dists[last]
            self.norms[row] = self.norms[last]
            self.totals[row] = self.totals[last]
            self.online[row] = self.online[last]
        self.ids.pop()

    def _grow(self) -> None:
        self.hists = np.asfortranarray(np.concatenate([self.hists, np.zeros_like(self.hists)]))
        self.dists = np.concatenate([self.dists, np.zeros_like(self.dists)])
        self.norms = np.concatenate([self.norms, np.zeros_like(self.norms)])
        self.totals = np.concatenate([self.totals, np.zeros_like(self.totals)])
        self.online = np.concatenate([self.online, np.zeros_like(self.online)])


class NodeStore:
    """Node metadata and liveness, persisted in SQLite, queried from memory.

    `path` is a file (created if missing; its folder must exist) or `":memory:"`. Opening a file
    loads every stored node into the cache, so a restarted MdS answers at once. Thread-safe (one
    lock); the MdS uses it from one worker thread anyway.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ValueError(f"{self.path}: schema version {version} is newer than this code's {SCHEMA_VERSION}")
            self._db.execute(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._nodes: dict[str, _NodeState] = {}
            self._groups: dict[tuple[str, str], _Group] = {}
            self.skipped_rows = 0
            self._load()
        except BaseException:
            self._db.close()
            raise

    # --- writes --------------------------------------------------------------------------------

    def upsert_meta(self, meta: NodeMeta) -> None:
        """Store a node's metadata in place of what was stored (the latest received wins).

        Raises `ValueError` for a histogram that is not 1..4096 finite non-negative counts, or whose
        width differs from the other nodes of the same (arch_id, lineage).
        """
        node_id = topics.validate_node_id(meta.node_id)
        hist = _as_hist(meta.hist)
        if not math.isfinite(meta.ts):
            raise ValueError(f"node {node_id}: meta ts must be finite")
        key = (meta.arch_id, meta.lineage)
        with self._lock:
            state = self._nodes.get(node_id)
            group = self._groups.get(key)
            alone = group is not None and group.size == 1 and node_id in group.rows
            if group is not None and group.n_classes != hist.size and not alone:
                raise ValueError(
                    f"node {node_id}: histogram of {hist.size} classes, but the nodes of arch "
                    f"{meta.arch_id!r} lineage {meta.lineage!r} have {group.n_classes}"
                )
            self._db.execute(
                f"INSERT INTO nodes ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?) "
                "ON CONFLICT(node_id) DO UPDATE SET arch_id=excluded.arch_id, lineage=excluded.lineage, "
                "hist=excluded.hist, rolling_error=excluded.rolling_error, batches=excluded.batches, "
                "helpers=excluded.helpers, updated_at=excluded.updated_at, meta_ts=excluded.meta_ts",
                (
                    node_id,
                    meta.arch_id,
                    meta.lineage,
                    hist.astype(_HIST_DTYPE).tobytes(),
                    meta.rolling_error,
                    meta.batches,
                    meta.helpers,
                    time.time(),
                    meta.ts,
                ),
            )
            online = state.online if state is not None else False
            self._place(node_id, key, hist, online)
            self._nodes[node_id] = _NodeState(online, key)

    def set_online(self, node_id: str, online: bool) -> bool:
        """Record a node's liveness (a node without metadata gets a row too); True if it changed."""
        topics.validate_node_id(node_id)
        online = bool(online)
        with self._lock:
            state = self._nodes.get(node_id)
            if state is not None and state.online == online:
                return False
            self._db.execute(
                "INSERT INTO nodes (node_id, online, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(node_id) DO UPDATE SET online=excluded.online, updated_at=excluded.updated_at",
                (node_id, int(online), time.time()),
            )
            if state is None:
                self._nodes[node_id] = _NodeState(online, None)
            else:
                state.online = online
                if state.group is not None:
                    self._groups[state.group].set_online(node_id, online)
            return True

    def remove(self, node_id: str) -> bool:
        """Forget a node entirely (its retained metadata was cleared); True if it was known."""
        topics.validate_node_id(node_id)
        with self._lock:
            state = self._nodes.pop(node_id, None)
            if state is None:
                return False
            self._db.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,))
            if state.group is not None:
                self._unplace(node_id, state.group)
            return True

    # --- reads ---------------------------------------------------------------------------------

    def query(
        self,
        asker: str,
        arch_id: str,
        lineage: str,
        classes: Sequence[int],
        hist: Sequence[float] | np.ndarray,
        k: int,
        metric: str = "cosine",
        min_class_share: float = 0.01,
        cover: str = "all",
        rank: str = "most_similar",
    ) -> list[Match]:
        """The `k` online nodes of `arch_id`/`lineage` most similar to `hist`, best first.

        Never the asker, an offline node, another architecture or lineage. A node *holds* a class
        when at least `min_class_share` of its histogram is that class. `cover` says which nodes
        qualify: `all` (they hold every one of `classes`), `any` (they hold at least one; ranked
        first by how many they hold, then by similarity) or `none` (every node). `rank`
        `least_similar` turns the similarity order round. Each match names the requested classes
        the node holds. An empty list when nobody qualifies. Raises `QueryRejected` (`arch_mismatch`: no node runs `arch_id`;
        `lineage_mismatch`: none of that lineage; `bad_request`: `hist` of the wrong width or
        invalid, a class out of range, a bad `k`) and `ValueError` for an unknown `metric` or a
        `min_class_share` outside [0, 1].
        """
        if metric not in SIMILARITIES:
            raise ValueError(f"unknown metric {metric!r}; known: {sorted(SIMILARITIES)}")
        if not 0.0 <= min_class_share <= 1.0:
            raise ValueError(f"min_class_share must be in [0, 1], got {min_class_share}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise QueryRejected("bad_request", f"k must be a non-negative int, got {k!r}")
        if cover not in _COVERS or rank not in _RANKS:
            raise QueryRejected("bad_request", f"cover must be one of {_COVERS} and rank one of {_RANKS}")
        try:
            q = _as_hist(hist)
            wanted = np.unique(np.asarray(classes, dtype=np.int64).reshape(-1))
        except (ValueError, TypeError, OverflowError) as exc:
            raise QueryRejected("bad_request", str(exc)) from exc
        with self._lock:
            group = self._groups.get((arch_id, lineage))
            if group is None:
                if any(arch == arch_id for arch, _ in self._groups):
                    raise QueryRejected("lineage_mismatch", f"no node of arch {arch_id!r} has lineage {lineage!r}")
                raise QueryRejected("arch_mismatch", f"no node runs arch {arch_id!r}")
            if q.size != group.n_classes:
                raise QueryRejected(
                    "bad_request", f"histogram of {q.size} classes; arch {arch_id!r} has {group.n_classes}"
                )
            if wanted.size and (wanted[0] < 0 or wanted[-1] >= group.n_classes):
                raise QueryRejected("bad_request", f"classes must be in [0, {group.n_classes})")
            n = group.size
            hists = group.hists[:n]
            eligible = group.online[:n].copy()
            asker_row = group.rows.get(asker)
            if asker_row is not None:
                eligible[asker_row] = False
            # share >= min  <=>  count >= min * total, without normalising the whole matrix; one
            # column at a time (the matrix is column-major), counting as it goes.
            thresholds = min_class_share * group.totals[:n]
            holds = np.empty((n, wanted.size), dtype=bool, order="F")
            held = np.zeros(n, dtype=np.intp)
            for j, c in enumerate(wanted):
                np.greater_equal(hists[:, c], thresholds, out=holds[:, j])
                held += holds[:, j]
            if cover == "all":
                eligible &= held == wanted.size
            elif cover == "any" and wanted.size:
                eligible &= held > 0
            eligible &= group.totals[:n] > 0  # a node that has seen nothing knows nothing
            total = q.sum()
            p = q / total if total > 0 else np.zeros_like(q)
            # Only eligible rows are scored: each row's score is computed the same way whatever
            # rows surround it, so this gives the same numbers for a fraction of the reads.
            cand = np.flatnonzero(eligible)
            scores = OF_DISTRIBUTIONS[metric](p, np.take(group.dists, cand, axis=0), group.norms[cand])
            cand_held = held[cand]
            found: list[Match] = []
            # Best coverage first; within one level of coverage, by similarity.
            levels = np.flatnonzero(np.bincount(cand_held))[::-1] if cover == "any" else [None]
            for level in levels:
                if len(found) >= k:
                    break
                at = np.arange(cand.size) if level is None else np.flatnonzero(cand_held == level)
                picked, picked_scores = best_rows(scores, at, int(k) - len(found), least=rank == "least_similar")
                for r, score in zip(cand[picked], picked_scores):
                    found.append(Match(group.ids[r], float(score), tuple(int(c) for c in wanted[holds[r]])))
            return found

    def get(self, node_id: str) -> NodeRecord | None:
        """The stored row of a node (read from SQLite), or None."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        if row is None:
            return None
        hist = np.frombuffer(row[3], dtype=_HIST_DTYPE).astype(np.float64) if row[3] is not None else None
        return NodeRecord(
            node_id=row[0],
            arch_id=row[1],
            lineage=row[2],
            hist=hist,
            rolling_error=row[4],
            batches=row[5],
            helpers=row[6],
            online=bool(row[7]),
            updated_at=row[8],
            meta_ts=row[9],
        )

    def count(self, *, online: bool | None = None) -> int:
        """Nodes with metadata; only the online (True) or offline (False) ones if `online` is given."""
        with self._lock:
            return sum(
                1 for s in self._nodes.values() if s.group is not None and (online is None or s.online == online)
            )

    def group_counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        """`{(arch_id, lineage): (nodes, online nodes)}` over the nodes with metadata."""
        with self._lock:
            return {key: (g.size, int(g.online[: g.size].sum())) for key, g in self._groups.items()}

    def snapshot(self, arch_id: str | None = None, lineage: str | None = None) -> Snapshot:
        """Copies of the cached arrays for the nodes with metadata (of `arch_id`/`lineage` if given).

        Groups are concatenated in a fixed order; narrower histograms are zero-padded to the widest
        (a class an architecture lacks has count 0), so `hists` is always one (N, C) matrix.
        """
        with self._lock:
            keys = sorted(
                key
                for key in self._groups
                if (arch_id is None or key[0] == arch_id) and (lineage is None or key[1] == lineage)
            )
            groups = [(key, self._groups[key]) for key in keys]
            width = max((g.n_classes for _, g in groups), default=0)
            n = sum(g.size for _, g in groups)
            hists = np.zeros((n, width))
            ids: list[str] = []
            online = np.zeros(n, dtype=bool)
            archs: list[str] = []
            lins: list[str] = []
            start = 0
            for (arch, lin), g in groups:
                stop = start + g.size
                hists[start:stop, : g.n_classes] = g.hists[: g.size]
                online[start:stop] = g.online[: g.size]
                ids += g.ids
                archs += [arch] * g.size
                lins += [lin] * g.size
                start = stop
        return Snapshot(
            node_ids=np.array(ids, dtype=object),
            online=online,
            arch_ids=np.array(archs, dtype=object),
            lineages=np.array(lins, dtype=object),
            hists=hists,
        )

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> "NodeStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------------

    def _load(self) -> None:
        for row in self._db.execute(f"SELECT {_COLUMNS} FROM nodes ORDER BY node_id"):
            node_id, arch_id, lineage, blob, online = row[0], row[1], row[2], row[3], bool(row[7])
            key = None
            if arch_id is not None and lineage is not None and blob is not None:
                try:
                    if len(blob) % _HIST_DTYPE.itemsize:
                        raise ValueError("histogram blob length is not a multiple of 8")
                    hist = _as_hist(np.frombuffer(blob, dtype=_HIST_DTYPE))
                    group = self._groups.get((arch_id, lineage))
                    if group is not None and group.n_classes != hist.size:
                        raise ValueError(f"histogram width {hist.size} differs from its group's {group.n_classes}")
                except ValueError as exc:
                    self.skipped_rows += 1
                    log.warning("%s: skipping the metadata of node %r: %s", self.path, node_id, exc)
                else:
                    key = (arch_id, lineage)
                    self._place(node_id, key, hist, online)
            self._nodes[node_id] = _NodeState(online, key)

    def _place(self, node_id: str, key: tuple[str, str], hist: np.ndarray, online: bool) -> None:
        state = self._nodes.get(node_id)
        if state is not None and state.group is not None and state.group != key:
            self._unplace(node_id, state.group)
        group = self._groups.get(key)
        if group is not None and group.n_classes != hist.size:  # the node was its group's only member
            self._unplace(node_id, key)
            group = None
        if group is None:
            group = self._groups[key] = _Group(hist.size)
        group.put(node_id, hist, online)

    def _unplace(self, node_id: str, key: tuple[str, str]) -> None:
        group = self._groups[key]
        group.drop(node_id)
        if group.size == 0:  # an empty group forgets its width C
            del self._groups[key]


def _as_hist(values: Sequence[float] | np.ndarray) -> np.ndarray:
    hist = np.asarray(values, dtype=np.float64)
    if hist.ndim != 1 or not 1 <= hist.size <= MAX_CLASSES:
        raise ValueError(f"a histogram must be 1-D with 1..{MAX_CLASSES} classes, got shape {hist.shape}")
    if not np.all(np.isfinite(hist)) or np.any(hist < 0):
        raise ValueError("a histogram must hold finite non-negative counts")
    return hist


__all__ = ["MAX_CLASSES", "NodeRecord", "NodeStore", "QueryRejected", "Snapshot"]
