"""The tuner's history: observations and decisions in SQLite, in the sidecar's state directory.

The slow loop learns from it, and a restarted sidecar warm-starts from it. One small file, written by the sidecar's
event loop only (SQLite in WAL mode, ``synchronous=NORMAL``: a crash may lose the last second, never the file).
Rows older than ``keep_s`` are pruned, so the file stays bounded however long the sidecar runs.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from sidecar.tuner.policy import Decision, Observation

_SCHEMA = """
CREATE TABLE IF NOT EXISTS observations (
    at REAL NOT NULL,
    wall REAL NOT NULL,
    load_level TEXT NOT NULL,
    settings TEXT NOT NULL,
    goodput REAL NOT NULL,
    attainment REAL NOT NULL,
    offered REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS observations_wall ON observations (wall);
CREATE TABLE IF NOT EXISTS decisions (
    wall REAL NOT NULL,
    knob TEXT NOT NULL,
    old TEXT,
    new TEXT,
    reason TEXT NOT NULL,
    source TEXT NOT NULL,
    load_level TEXT NOT NULL,
    readings TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_wall ON decisions (wall);
"""


class TunerStore:
    """Append observations and decisions; read observations back, newest last."""

    def __init__(self, path: str | Path, *, keep_s: float = 7 * 86400.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keep_s = keep_s
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add_observation(self, obs: Observation, wall: float) -> None:
        self._db.execute(
            "INSERT INTO observations VALUES (?, ?, ?, ?, ?, ?, ?)",
            (obs.at, wall, obs.load_level, json.dumps(dict(obs.settings), sort_keys=True), obs.goodput_per_s,
             obs.attainment, obs.offered_per_s),
        )

    def add_decisions(self, decisions: list[Decision], wall: float) -> None:
        self._db.executemany(
            "INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(wall, d.knob, json.dumps(d.old), json.dumps(d.new), d.reason, d.source, d.load_level,
              json.dumps(dict(d.readings))) for d in decisions],
        )

    def observations(self, *, since_wall: float | None = None) -> Iterator[Observation]:
        query = "SELECT at, load_level, settings, goodput, attainment, offered FROM observations"
        args: tuple = ()
        if since_wall is not None:
            query += " WHERE wall >= ?"
            args = (since_wall,)
        for at, level, settings, goodput, attainment, offered in self._db.execute(query + " ORDER BY rowid", args):
            yield Observation(at, level, json.loads(settings), goodput, attainment, offered)

    def recent_decisions(self, limit: int) -> list[dict[str, object]]:
        rows = self._db.execute(
            "SELECT wall, knob, old, new, reason, source, load_level, readings FROM decisions "
            "ORDER BY rowid DESC LIMIT ?", (limit,),
        ).fetchall()
        return [
            {"wall": wall, "knob": knob, "old": json.loads(old), "new": json.loads(new), "reason": reason,
             "source": source, "load_level": level, "readings": json.loads(readings)}
            for wall, knob, old, new, reason, source, level, readings in reversed(rows)
        ]

    def counts(self) -> tuple[int, int]:
        obs = self._db.execute("SELECT COUNT(*) FROM observations").fetchone()[0]
        dec = self._db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
        return int(obs), int(dec)

    def prune(self, wall: float) -> None:
        cutoff = wall - self.keep_s
        self._db.execute("DELETE FROM observations WHERE wall < ?", (cutoff,))
        self._db.execute("DELETE FROM decisions WHERE wall < ?", (cutoff,))


__all__ = ["TunerStore"]
