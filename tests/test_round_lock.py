"""One round at a time per store, and round ids used once."""

from __future__ import annotations

import json
import threading
import time

import pytest

from server.round_lock import LOCK, check_round_id_unused, read_lock, round_lock
from shared.errors import UserError
from shared.storage import open_store


def test_a_second_round_is_refused_while_the_first_holds_the_lock(tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    with round_lock(store, "r1", 60, settle=0.01):
        assert read_lock(store)["round_id"] == "r1"
        with pytest.raises(UserError, match=r"another round \(r1\) holds"), round_lock(store, "r2", 60, settle=0.01):
            pytest.fail("the second round ran")
        assert read_lock(store)["round_id"] == "r1"  # the refused round did not touch the holder's lock
    assert store.info(LOCK) is None  # released at the end
    with pytest.raises(RuntimeError), round_lock(store, "r3", 60, settle=0.01):
        raise RuntimeError("the round failed")
    assert store.info(LOCK) is None  # released whatever the outcome


def test_an_expired_lock_of_a_killed_round_is_taken_over(tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    store.put_bytes(LOCK, json.dumps({"round_id": "killed", "token": "x", "expires": time.time() - 1}).encode())
    with round_lock(store, "next", 60, settle=0.01):
        assert read_lock(store)["round_id"] == "next"


def test_of_two_rounds_starting_together_at_most_one_goes_on(tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    ran, refused, barrier = [], [], threading.Barrier(2)

    def attempt(name: str) -> None:
        barrier.wait()
        try:
            with round_lock(store, name, 60, settle=0.3):
                ran.append(name)
                time.sleep(0.5)
        except UserError:
            refused.append(name)

    threads = [threading.Thread(target=attempt, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ran) <= 1 and len(ran) + len(refused) == 2, (ran, refused)
    # when both wrote at once and neither could read its own lock back, what is left is unreadable, so stale:
    # the next round goes on
    if not ran:
        with round_lock(store, "next", 60, settle=0.01):
            assert read_lock(store)["round_id"] == "next"


def test_a_round_id_is_used_once(tmp_path):
    store = open_store(f"file://{tmp_path}/store")
    check_round_id_unused(store, "r1")
    store.put_bytes("rounds/r1/5/concept.json", b"{}")
    with pytest.raises(UserError, match="was already used"):
        check_round_id_unused(store, "r1")
    check_round_id_unused(store, "r10")  # a prefix of another id is not the same id
