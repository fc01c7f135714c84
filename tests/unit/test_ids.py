"""Request ids: unique, in time order, and never repeated by a forked worker."""

from __future__ import annotations

import os
import re
import time

from spillway import ids


def test_request_ids_are_32_hex_digits_and_unique() -> None:
    made = [ids.request_id() for _ in range(100_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in made[:100])
    assert len(set(made)) == len(made)


def test_request_ids_sort_in_time_order() -> None:
    earlier = ids.request_id()
    time.sleep(0.002)
    later = ids.request_id()
    assert earlier < later
    assert abs(int(later[:14], 16) / 1e6 - time.time()) < 5  # microseconds since the epoch


def test_random_hex_has_the_asked_length() -> None:
    assert re.fullmatch(r"[0-9a-f]{24}", ids.random_hex(12))
    assert len({ids.random_hex(8) for _ in range(1000)}) == 1000


def test_a_forked_worker_does_not_repeat_its_parents_sequence() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then exit without pytest's teardown
        os.write(write, "".join(ids.random_hex(8) for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 1024).decode()
    os.waitpid(pid, 0)
    parent = "".join(ids.random_hex(8) for _ in range(4))
    assert child != parent
