"""Calls handed to the event loop from other threads (``corral._delivery``): in order, one at a
time, never on the thread that hands them over, none lost whatever a call does."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import weakref
from typing import Any

import pytest

from conftest import wait_until
from corral._delivery import Delivery


def test_calls_from_other_threads_run_on_the_loop_in_order() -> None:
    ran: list[tuple[int, bool]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        delivery = Delivery.of(loop)
        assert Delivery.of(loop) is delivery  # one per loop
        me = threading.current_thread()
        done = asyncio.Event()

        def hand_over() -> None:
            for i in range(1000):
                delivery.call(lambda i=i: ran.append((i, threading.current_thread() is me)))
            delivery.call(lambda: loop.call_soon(done.set))

        threading.Thread(target=hand_over).start()
        await asyncio.wait_for(done.wait(), 10)

    asyncio.run(main())
    assert ran == [(i, True) for i in range(1000)]


def test_a_call_that_raises_is_logged_and_the_next_ones_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[int] = []

    def broken() -> None:
        raise RuntimeError("a listener's bug")

    async def main() -> None:
        delivery = Delivery.of(asyncio.get_running_loop())
        delivery.call(ran.append, 1)
        delivery.call(broken)
        delivery.call(ran.append, 2)
        await asyncio.sleep(0)

    with caplog.at_level(logging.ERROR, logger="corral.executor"):
        asyncio.run(main())
    assert ran == [1, 2]
    [record] = caplog.records
    assert "the calls after it go on" in record.getMessage()
    assert record.exc_info is not None and "a listener's bug" in str(record.exc_info[1])


def test_a_keyboard_interrupt_in_a_call_leaves_the_rest_for_the_next_turn() -> None:
    ran: list[int] = []

    def interrupted() -> None:
        raise KeyboardInterrupt

    loop = asyncio.new_event_loop()
    try:
        delivery = Delivery.of(loop)
        delivery.call(ran.append, 1)
        delivery.call(interrupted)
        delivery.call(ran.append, 2)
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(asyncio.sleep(0))
        assert ran == [1]
        loop.run_until_complete(asyncio.sleep(0))
        assert ran == [1, 2]
    finally:
        loop.close()


def test_a_thread_that_blocks_the_loop_runs_the_calls_while_it_waits() -> None:
    """Even from inside a call: the calls handed over with it, still queued, run there too."""
    ran: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        delivery = Delivery.of(loop)
        over = threading.Event()

        def block_the_loop() -> None:  # as a shutdown(wait=True) called by a listener
            assert delivery.on_loop_thread()
            threading.Thread(target=from_elsewhere).start()
            delivery.serve(over)
            ran.append("returned")

        def from_elsewhere() -> None:
            delivery.call(ran.append, "handed over while blocked")
            delivery.call(over.set)
            delivery.call(delivery.wake)

        delivery.call(block_the_loop)
        delivery.call(ran.append, "queued behind the blocking call")
        await asyncio.sleep(0)

    asyncio.run(main())
    assert ran == [
        "queued behind the blocking call",
        "handed over while blocked",
        "returned",
    ]


def test_with_no_loop_or_a_closed_one_a_thread_of_its_own_runs_the_calls() -> None:
    threads: list[str] = []
    for delivery in (Delivery.of(None), _closed_loop_delivery()):
        done = threading.Event()
        delivery.call(lambda: threads.append(threading.current_thread().name))
        delivery.call(done.set)
        assert done.wait(10)
    assert threads == ["corral-delivery", "corral-delivery"]


def _closed_loop_delivery() -> Delivery:
    loop = asyncio.new_event_loop()
    loop.close()
    return Delivery.of(loop)


def test_calls_stranded_on_a_loop_that_stopped_run_where_the_drain_asks() -> None:
    loop = asyncio.new_event_loop()
    try:
        delivery = Delivery.of(loop)
        ran: list[Any] = []
        delivery.call(ran.append, 1)  # the loop was never run again
        delivery.run_if_stranded()
        assert ran == [1]
        loop.close()
        delivery.call(ran.append, 2)
        wait_until(lambda: ran == [1, 2], what="the call after the loop closed")
    finally:
        if not loop.is_closed():
            loop.close()


def test_calls_run_one_at_a_time_whichever_thread_finds_them_stranded() -> None:
    """Two drains (two executors on one loop that stopped) look for stranded calls: one runs
    them, in order; the other leaves them to it."""
    loop = asyncio.new_event_loop()
    try:
        delivery = Delivery.of(loop)
        inside, go_on = threading.Event(), threading.Event()
        ran: list[int] = []

        def first() -> None:
            inside.set()
            go_on.wait(10)
            ran.append(1)

        delivery.call(first)
        delivery.call(ran.append, 2)
        runner = threading.Thread(target=delivery.run_if_stranded)
        runner.start()
        assert inside.wait(10)
        delivery.run_if_stranded()  # the other drain: the first runs them
        assert ran == []
        go_on.set()
        runner.join(10)
        assert ran == [1, 2]
    finally:
        loop.close()


def test_a_delivery_keeps_no_loop_alive() -> None:
    loop = asyncio.new_event_loop()
    Delivery.of(loop).call(lambda: None)
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None
