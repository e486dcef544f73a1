"""Rendering: results to stdout, progress and errors to stderr, JSON when asked.

`Output` is the one place that decides between JSON, a table and plain lines, and the one
place errors are printed. Everything that comes from a server (details, ids, names) is
escaped before Rich renders it: a ``[bold]`` in an error message prints as text.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {"queued": "yellow", "running": "cyan", "finished": "green", "failed": "red"}
SHORT_ID_LEN = 8  # shortest id shown; longer where two events share the first 8 characters


class Output:
    """Where one invocation's output goes; ``json`` is the global ``--json`` flag.

    Consoles are built per use so they follow sys.stdout/sys.stderr as they are at that
    moment (Typer's CliRunner swaps them per invocation).
    """

    def __init__(self, json: bool = False) -> None:
        self.json = json

    # ---- consoles -----------------------------------------------------------------------
    @staticmethod
    def out_console() -> Console:
        return Console(highlight=False)

    @staticmethod
    def err_console() -> Console:
        return Console(stderr=True, highlight=False)

    # ---- results (stdout) ---------------------------------------------------------------
    def result(self, data: Any, human: Callable[[], RenderableType | str | None]) -> None:
        """``data`` as one JSON document with --json; otherwise what ``human()`` renders
        (a str is printed as plain text, escaped)."""
        if self.json:
            self.print_json(data)
            return
        rendered = human()
        if rendered is None:
            return
        self.print(rendered)

    def print(self, rendered: RenderableType | str) -> None:
        """A table or plain text on stdout; plain text is escaped and never wrapped."""
        if isinstance(rendered, str):
            self.out_console().print(Text(rendered), soft_wrap=True)
        else:
            self.out_console().print(rendered)

    def markup(self, markup: str) -> None:
        """Text with kvctl's own markup; the caller escapes what came from a server."""
        self.out_console().print(markup, soft_wrap=True)

    @staticmethod
    def print_json(data: Any) -> None:
        """One JSON document on stdout, nothing else: safe to pipe into jq."""
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()

    # ---- diagnostics (stderr) -----------------------------------------------------------
    def error(self, message: str) -> None:
        self.err_console().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)

    def warn(self, message: str) -> None:
        self.err_console().print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)

    def note(self, message: str) -> None:
        self.err_console().print(escape(message), soft_wrap=True, style="dim")

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        """A spinner on stderr while something slow runs (nothing when stderr is a file)."""
        with self.err_console().status(escape(message)):
            yield


# ------------------------------------------------------------------- formatting ----
def fmt_bytes(n: int | float | None) -> str:
    if not n:
        return "-" if n is None else "0 B"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - loop always returns


def fmt_ratio(ev: Mapping[str, Any]) -> str:
    """Size before / after: >1 means smaller after (compress), <1 larger (decompress)."""
    before, after = ev.get("bytes_before") or 0, ev.get("bytes_after") or 0
    if not before or not after:
        return "-"
    return f"{before / after:.2f}x"


def elapsed(ev: Mapping[str, Any], now: float | None = None) -> str:
    start = ev.get("started_at") or ev.get("created_at")
    if start is None:
        return "-"
    end = ev.get("finished_at") or (now if now is not None else time.time())
    return f"{max(0.0, end - start):.1f}s"


def status_text(status: str | None) -> Text:
    s = status or "?"
    return Text(s, style=STATUS_STYLE.get(s, ""))


def _tail(event_id: str) -> str | None:
    """The random part of a kvctl id (``compress-<32 hex>`` -> the hex), None for others."""
    _, sep, tail = event_id.rpartition("-")
    if sep and len(tail) >= 16 and all(c in "0123456789abcdef" for c in tail):
        return tail
    return None


def short_ids(event_ids: Iterable[str]) -> dict[str, str]:
    """Full id -> the shortest prefix of its random part (>= 8 characters) that no other
    listed id shares. kvctl's controller accepts it wherever an id is expected. Ids of
    other controllers are shown whole."""
    tails = {str(e): _tail(str(e)) for e in event_ids}
    known = [t for t in tails.values() if t]
    out = {}
    for full, tail in tails.items():
        if tail is None:
            out[full] = full
            continue
        n = SHORT_ID_LEN
        while n < len(tail) and any(o != tail and o.startswith(tail[:n]) for o in known):
            n += 1
        out[full] = tail[:n]
    return out


def short_id(event_id: str) -> str:
    return short_ids([event_id])[event_id]


def events_table(events: Iterable[Mapping[str, Any]], title: str | None = None,
                 now: float | None = None, wide: bool = False, width: int = 80) -> Table:
    """One row per event, 80 columns wide at most: short ids (typeable, never folded),
    op, method, state, chunks, size after, ratio, elapsed. `events show` has the rest.

    ``wide`` (`events list`): the instance and the error too, in what a terminal ``width``
    columns wide leaves (size after and ratio make room on a narrow one); they are cut
    with an ellipsis, never the other columns."""
    events = list(events)
    ids = short_ids(str(ev.get("event_id")) for ev in events)
    now = time.time() if now is None else now
    heads = ["id", "op", "method", "state", "chunks", "after", "ratio", "elapsed"]
    rows: list[list[Any]] = []
    for ev in events:
        total = ev.get("chunks_total")
        chunks = "-" if total is None else f"{ev.get('chunks_done', 0)}/{total}"
        rows.append([Text(ids[str(ev.get("event_id"))]), Text(str(ev.get("op") or "-")),
                     Text(str(ev.get("method") or "-")), status_text(ev.get("status")),
                     chunks, fmt_bytes(ev.get("bytes_after")) if "bytes_after" in ev else "-",
                     fmt_ratio(ev), elapsed(ev, now)])
    table = Table(title=title, header_style="bold", box=None, pad_edge=False,
                  padding=(0, 1, 0, 0))
    if not wide:
        # Only the method column gives way on a narrow terminal; the others are as wide as
        # their widest cell, so an id is never folded or cut.
        table.add_column("id", no_wrap=True, min_width=max((len(i) for i in ids.values()),
                                                          default=2))
        table.add_column("op", no_wrap=True, min_width=10)
        table.add_column("method", no_wrap=True, overflow="ellipsis", max_width=16)
        table.add_column("state", no_wrap=True, min_width=8)
        for col, min_width in (("chunks", 7), ("after", 9), ("ratio", 6), ("elapsed", 7)):
            table.add_column(col, justify="right", no_wrap=True, min_width=min_width)
        for row in rows:
            table.add_row(*row)
        return table
    # one line per event: an error's own newlines would break the table's rows
    extra = [[str(ev.get("instance_id") or "-"), " ".join(str(ev.get("error") or "-").split())]
             for ev in events]
    cols = _cell_widths(heads, rows)
    keep = list(range(len(heads)))
    left = width - sum(cols[i] + 1 for i in keep)
    if left < 2 * WIDE_MIN:  # size after and ratio make room (`events show` has them)
        keep = [i for i in keep if heads[i] not in ("after", "ratio")]
        left = width - sum(cols[i] + 1 for i in keep)
    inst_w = min(max(len(e[0]) for e in extra), max(WIDE_MIN, (left - 2) // 2), 24)
    err_w = max(WIDE_MIN, min(max(len(e[1]) for e in extra), left - inst_w - 2))
    for i in keep:
        table.add_column(heads[i], no_wrap=True, min_width=cols[i],
                         justify="right" if i >= 4 else "left")
    table.add_column("instance", no_wrap=True, overflow="ellipsis", width=max(inst_w, 8))
    table.add_column("error", no_wrap=True, overflow="ellipsis", width=err_w)
    for row, (inst, err) in zip(rows, extra, strict=True):
        table.add_row(*(row[i] for i in keep), Text(inst), Text(err))
    return table


# the narrowest the instance and error columns of `events list` get
WIDE_MIN = 8


def _cell_widths(heads: list[str], rows: list[list[Any]]) -> list[int]:
    return [max([len(h), *(len(r[i]) if isinstance(r[i], Text) else len(str(r[i]))
                           for r in rows)]) for i, h in enumerate(heads)]


def event_details(ev: Mapping[str, Any]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in ev.items():
        if key == "status":
            table.add_row(key, status_text(value))
        elif key.startswith("bytes_"):
            table.add_row(key, f"{fmt_bytes(value)} ({value} B)")
        elif key.endswith("_at") and isinstance(value, int | float):
            table.add_row(key, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
                          + f".{int((value % 1) * 1000):03d}")
        else:
            table.add_row(key, Text("-" if value is None else str(value)))
    if "bytes_before" in ev:
        table.add_row("ratio", fmt_ratio(ev))
        table.add_row("elapsed", elapsed(ev))
    return table


def kv_table(rows: Iterable[Sequence[Any]], headers: tuple[str, ...]) -> Table:
    table = Table(header_style="bold")
    for h in headers:
        table.add_column(h)
    for row in rows:
        table.add_row(*(Text(str(c)) for c in row))
    return table
