"""One round at a time per store: a lock object with an expiry, and round ids used once.

Flower lets two runs of the ServerApp start at once; both would fuse and publish against the same LATEST.
Before it hands out any upload URL, a round takes `fused/LOCK` (its round id, a token and an expiry). A
second round finds a live lock and refuses with the holder's id and expiry; an expired lock (its round was
killed) is taken over. The round removes the lock when it ends, whatever the outcome. Object stores have no
compare-and-swap here, so a round writes its lock, waits a moment and reads it back: of two rounds that
wrote at the same time, only the one whose lock survived goes on.

A round id names the uploads' keys (`rounds/<id>/<node>/...`), so a replayed id could overwrite the
packages an earlier version was fused from: a round refuses an id that already has objects in the store.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator

from shared.errors import UserError
from shared.storage import Store

LOCK = "fused/LOCK"
SETTLE_SECONDS = 1.0  # between writing the lock and reading it back


def read_lock(store: Store) -> dict | None:
    """The current lock's record, or None (no lock, or one that is not readable JSON: treated as stale)."""
    if store.info(LOCK) is None:
        return None
    try:
        record = json.loads(store.get_bytes(LOCK))
    except (UserError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("expires"), (int, float)) else None


@contextlib.contextmanager
def round_lock(store: Store, round_id: str, seconds: float, settle: float = SETTLE_SECONDS) -> Iterator[None]:
    """Hold the store's round lock for at most `seconds` while the block runs."""
    held = read_lock(store)
    now = time.time()
    if held and held["expires"] > now:
        raise UserError(f"another round ({str(held.get('round_id'))[:60]}) holds {store.url}/{LOCK} until "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(held['expires']))}; wait for it to end "
                        "(a killed round's lock expires by itself)")
    token = uuid.uuid4().hex
    store.put_bytes(LOCK, json.dumps({"round_id": round_id, "token": token, "expires": now + seconds}).encode())
    time.sleep(settle)
    current = read_lock(store)
    if not current or current.get("token") != token:
        raise UserError(f"another round took {store.url}/{LOCK} at the same moment "
                        f"({str((current or {}).get('round_id'))[:60]}); this one stops")
    try:
        yield
    finally:
        current = read_lock(store)
        if current and current.get("token") == token:
            store.delete(LOCK)


def check_round_id_unused(store: Store, round_id: str) -> None:
    """Refuse a round id that already has uploads (a replay would overwrite an earlier round's packages)."""
    if store.list(f"rounds/{round_id}/"):
        raise UserError(f"round id {round_id!r} was already used in {store.url} (it has uploads under "
                        f"rounds/{round_id}/); a round id is used once: give a new one or none")
