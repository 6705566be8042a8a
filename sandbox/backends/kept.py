"""Which kernel containers belong to a registered session, and so outlive their service.

The engine's session store (sandbox/store.py) writes the SQLite file named here, in the data
directory; backends only read it: the Docker backend's orphan reaping spares the containers
it names (docker_orphans.py, and docker_reaper.py, which repeats this query because it runs
standalone).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

DB_NAME = "sessions.db"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sessions ("
    " id TEXT PRIMARY KEY, container_id TEXT, record TEXT NOT NULL)"
)


def kept_containers(db_path: Path | None) -> set[str]:
    """Ids of the containers that registered sessions run in (none without a file)."""
    if db_path is None or not db_path.exists():
        return set()
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT container_id FROM sessions WHERE container_id IS NOT NULL"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        # Refusing to guess either way would leave orphans forever; sparing nothing would
        # kill live sessions. The file exists, so sessions may: say so loudly and spare none.
        log.error("cannot read the session registry %s: %s; no kernel is kept", db_path, exc)
        return set()
    return {row[0] for row in rows}
