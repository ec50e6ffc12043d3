"""TurnBatcher: what many request tasks hand in during one event-loop turn is processed as one batch."""

from __future__ import annotations

import asyncio

import pytest

from monitor.batch import TurnBatcher


def test_tasks_woken_together_are_one_batch_and_each_gets_its_own_result():
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [x * 10 for x in items]

    async def main() -> list[int]:
        tb = TurnBatcher(run)
        go = asyncio.Event()

        async def request(i: int) -> int:
            await go.wait()  # an engine step wakes every request in the same turn
            return await tb.submit(i)

        tasks = [asyncio.create_task(request(i)) for i in range(16)]
        await asyncio.sleep(0)
        go.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [i * 10 for i in range(16)]
    assert calls == [list(range(16))]


def test_items_handed_in_later_make_a_later_batch_and_a_failing_run_fails_only_its_callers():
    calls: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        calls.append(list(items))
        if "bad" in items:
            raise RuntimeError("boom")
        return [x.upper() for x in items]

    async def main() -> tuple:
        tb = TurnBatcher(run)
        first = await asyncio.gather(tb.submit("a"), tb.submit("b"))
        with pytest.raises(RuntimeError, match="boom"):
            await asyncio.gather(tb.submit("bad"), tb.submit("c"))
        return first, await tb.submit("d")

    first, after = asyncio.run(main())
    assert first == ["A", "B"] and after == "D"
    assert calls == [["a", "b"], ["bad", "c"], ["d"]]
