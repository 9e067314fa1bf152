"""Messages over 4 GiB (opt-in: ``pytest -m huge``; needs ~13 GiB of free memory).

The length no longer fits the 4-byte header, so the 64-bit header path is exercised
(lengths past 2**31 and 2**32 included).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.huge

HUGE_SIZE = (4 << 30) + 4099


def _huge_message():
    data = bytearray(HUGE_SIZE)
    # marks around the 2**31 and 2**32 boundaries and at both ends catch shifted data
    for position in (0, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, HUGE_SIZE - 1):
        data[position] = (position * 7 + 1) & 0xFF or 1
    return data


def test_message_over_4_gib(impl, run_in_thread):
    data = _huge_message()
    a, b = impl.Pipe()
    with a, b:
        sender = run_in_thread(b.send_bytes, data)
        got = a.recv_bytes()
        sender.join(600)
        assert not sender.errors, sender.errors
        assert len(got) == HUGE_SIZE
        assert got == data
        del got
        b.send("after")
        assert a.recv() == "after"


def test_message_over_4_gib_into_a_buffer(impl, run_in_thread):
    data = _huge_message()
    target = bytearray(HUGE_SIZE + 8)
    reader, writer = impl.Pipe(duplex=False)
    with reader, writer:
        sender = run_in_thread(writer.send_bytes, data)
        assert reader.recv_bytes_into(target, 8) == HUGE_SIZE
        sender.join(600)
        assert not sender.errors, sender.errors
        assert memoryview(target)[8:] == memoryview(data)
