"""Rendering: results to stdout, progress and errors to stderr, JSON when asked.

Everything that comes from a server (details, ids, names) is escaped before rich renders
it: a ``[bold]`` in an error message must print as text, not as markup.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {"queued": "yellow", "running": "cyan", "finished": "green", "failed": "red"}


# Consoles are built per use so they follow sys.stdout/sys.stderr as they are at that moment
# (Typer's CliRunner swaps them per invocation).
def out() -> Console:
    return Console(highlight=False)


def err() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    """One JSON document on stdout, nothing else: safe to pipe into jq."""
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    err().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def note(message: str) -> None:
    err().print(escape(message), soft_wrap=True, style="dim")


def warn(message: str) -> None:
    err().print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


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


def events_table(events: Iterable[Mapping[str, Any]], title: str | None = None) -> Table:
    """One row per event; fits 80 columns with full ids folded, wider terminals unfolded."""
    from rich import box

    events = list(events)
    # kvctl's ids start with the op ("compress-…"): an op column would only repeat them
    show_op = any(not str(ev.get("event_id", "")).startswith(f"{ev.get('op')}-")
                  for ev in events)
    table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("event", overflow="fold", min_width=16)
    cols = (("op", "left"),) if show_op else ()
    cols += (("state", "left"), ("chunks", "right"), ("before", "right"), ("after", "right"),
             ("ratio", "right"), ("elapsed", "right"))
    for col, justify in cols:
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    now = time.time()
    for ev in events:
        total = ev.get("chunks_total")
        chunks = "-" if total is None else f"{ev.get('chunks_done', 0)}/{total}"
        row: list[Any] = [Text(str(ev.get("event_id", "?")))]
        if show_op:
            row.append(Text(str(ev.get("op", "-"))))
        row += [status_text(ev.get("status")), chunks,
                fmt_bytes(ev.get("bytes_before")) if "bytes_before" in ev else "-",
                fmt_bytes(ev.get("bytes_after")) if "bytes_after" in ev else "-",
                fmt_ratio(ev), elapsed(ev, now)]
        table.add_row(*row)
    return table


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
