"""Prefect's local database, migrated before a flow starts, one process at a time.

Without PREFECT_API_URL a flow starts Prefect's temporary API server, which migrates its SQLite database
(`$PREFECT_HOME/prefect.db`) as it starts. Two commands started at once on a fresh home ran those migrations side by
side and one printed `sqlite3.OperationalError: duplicate column name: state_timestamp` (about 190 lines). So the
CLI migrates the database itself first, under the file lock that serialises initialising MLflow's store
(registry.tracking.store_lock), and leaves a marker per Prefect version; the server then finds it up to date.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _migrate() -> None:
    import asyncio

    from prefect.server.database import provide_database_interface

    asyncio.run(provide_database_interface().create_db())  # Prefect's own alembic upgrade to head


def _local_db() -> Path | None:
    """The SQLite file of the temporary server a flow will start; None with an API URL or another database."""
    from prefect.settings import get_current_settings

    s = get_current_settings()
    url = s.server.database.connection_url
    url = url.get_secret_value() if url is not None else ""
    if s.api.url or not url.startswith("sqlite") or ":memory:" in url or "///" not in url:
        return None
    return Path(url.split("///", 1)[1].split("?", 1)[0])


def init_prefect_database(migrate: Callable[[], None] = _migrate, db: Path | None = None) -> bool:
    """Migrate the local Prefect database once per Prefect version, under MLflow's store lock; True when this call
    migrated it. `migrate` and `db` are for tests."""
    import prefect

    from registry.tracking import store_lock, store_lock_path, tracking_uri

    db = db or _local_db()
    if db is None:
        return False
    marker = db.parent / f".{db.name}.cpmant-migrated-{prefect.__version__}"

    def done() -> bool:
        return marker.exists() and db.exists()

    if done():
        return False
    uri = tracking_uri()
    with store_lock(uri if store_lock_path(uri) is not None else f"sqlite:///{db}"):
        if done():  # another command migrated it while this one waited
            return False
        db.parent.mkdir(parents=True, exist_ok=True)
        migrate()
        marker.touch()
    return True
