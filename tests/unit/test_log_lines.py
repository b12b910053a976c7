"""The worker's log lines: whole lines, and one write() for the lines an event loop logs in one turn."""

from __future__ import annotations

import asyncio
import json

from workers.logging import LineBatchingLogger


class _Stream:
    """A stream that records each write() as it came."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_lines_logged_in_one_turn_of_the_loop_go_out_in_one_write_and_stay_whole():
    stream = _Stream()
    logger = LineBatchingLogger(stream)

    async def batch_finishes() -> None:
        # a batch's messages finish in one turn: each task logs its line
        async def one(i: int) -> None:
            logger.info(json.dumps({"event": "message_processed", "n": i}))

        await asyncio.gather(*(one(i) for i in range(50)))

    asyncio.run(batch_finishes())
    assert len(stream.writes) == 1  # kept until the end of the turn, then one write()
    lines = stream.writes[0].splitlines(keepends=True)
    assert [json.loads(line)["n"] for line in lines] == list(range(50))
    assert all(line.endswith("\n") for line in lines)


def test_lines_logged_off_the_loop_are_written_at_once_one_write_each():
    stream = _Stream()
    logger = LineBatchingLogger(stream)
    logger.warning('{"event": "a"}')
    logger.error('{"event": "b"}')
    assert stream.writes == ['{"event": "a"}\n', '{"event": "b"}\n']
