"""Renderers on fixed events at a pinned terminal width (80 columns, no colour)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from kvctl.output import event_details, events_table, fmt_bytes, short_ids

EVENTS = [
    {"event_id": "compress-3f2a8b1c9d0e4f5a6b7c8d9e0f1a2b3c", "op": "compress",
     "method": "cachegen", "num_tokens": 300, "chunks_total": 2, "status": "finished",
     "chunks_done": 2, "bytes_before": 2304000, "bytes_after": 512000, "created_at": 1000.0,
     "started_at": 1000.5, "finished_at": 1002.75},
    {"event_id": "decompress-3f2a8b1c77777777777777777777777a", "op": "decompress",
     "method": "cachegen-compact", "chunks_total": 47, "status": "failed", "chunks_done": 12,
     "bytes_before": 1000, "bytes_after": 123456789, "created_at": 1000.0,
     "started_at": 1001.0, "finished_at": 1123.4},
    {"event_id": "move-0123456789abcdef0123456789abcdef", "op": "move", "method": None,
     "chunks_total": 1, "status": "queued", "chunks_done": 0, "bytes_before": 0,
     "bytes_after": 0, "created_at": 1000.0, "started_at": None, "finished_at": None},
    {"event_id": "ev-1", "status": "finished"},  # upstream LMCache: an id and a status
]

TABLE_80 = """\
id        op         method           state     chunks     after  ratio elapsed
3f2a8b1c9 compress   cachegen         finished     2/2 500.0 KiB  4.50x    2.2s
3f2a8b1c7 decompress cachegen-compact failed     12/47 117.7 MiB  0.00x  122.4s
01234567  move       -                queued       0/1       0 B      -   10.0s
ev-1      -          -                finished       -         -      -       -
"""


def render(renderable, width: int = 80) -> str:
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_events_table_fits_80_columns_with_short_ids():
    text = render(events_table(EVENTS, now=1010.0))
    assert text == TABLE_80
    assert max(len(line) for line in text.splitlines()) <= 80


def test_long_foreign_ids_are_never_cut():
    ev = {"event_id": "x" * 50, "status": "running"}
    text = render(events_table([ev], now=0.0))
    assert "x" * 50 in text


def test_short_ids_grow_until_unique():
    ids = ["compress-" + "a" * 32, "decompress-" + "a" * 12 + "b" * 20,
           "move-" + "c" * 32, "ev-1", "compress-" + "a" * 32]
    assert short_ids(ids) == {ids[0]: "a" * 13, ids[1]: "a" * 12 + "b", ids[2]: "c" * 8,
                              "ev-1": "ev-1"}


def test_event_details_escapes_server_text(monkeypatch):
    import time

    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        ev = dict(EVENTS[1], error="disk [bold]full[/bold]")
        text = render(event_details(ev))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert "error         disk [bold]full[/bold]" in text
    assert "bytes_after   117.7 MiB (123456789 B)" in text
    assert "finished_at   1970-01-01 00:18:43.400" in text
    assert "ratio         0.00x" in text


@pytest.mark.parametrize("n,text", [(None, "-"), (0, "0 B"), (1023, "1023 B"),
                                    (1024, "1.0 KiB"), (5 * 2**30, "5.0 GiB")])
def test_fmt_bytes(n, text):
    assert fmt_bytes(n) == text
