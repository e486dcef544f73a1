"""`kvctl events`: watch, list and show the controller's tracked events."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from kvctl import output
from kvctl.client import ControllerClient, UntrackedEvents
from kvctl.commands._common import POLL_SECONDS, connect
from kvctl.common.events import ENDED, STATUSES
from kvctl.errors import EXIT_INTERRUPTED, KvctlError, UsageError
from kvctl.options import ControllerOpt, JsonOpt, TimeoutOpt
from kvctl.settings import resolve

app = typer.Typer(help="Follow compress/decompress/move/... events on the controller.",
                  no_args_is_help=True)



NEW_EVENTS_WINDOW = 200  # recent events listed per poll to spot new ones


def _initial(client: ControllerClient, ids: list[str], watch_all: bool
             ) -> tuple[dict[str, Any], set[str]]:
    """The events to follow now, and every id the controller listed (to tell new ones)."""
    events: dict[str, Any] = {}
    seen: set[str] = set()
    if watch_all:
        for ev in client.events():
            seen.add(ev["event_id"])
            if ev.get("status") not in ENDED:
                events[ev["event_id"]] = ev
    for event_id in ids:
        events[event_id] = client.event(event_id)
    return events, seen


def _new_events(client: ControllerClient, seen: set[str]) -> dict[str, Any]:
    """Events created since the watch started (ended ones too: they are news)."""
    fresh = {}
    for ev in client.events(limit=NEW_EVENTS_WINDOW):
        if ev["event_id"] not in seen:
            seen.add(ev["event_id"])
            fresh[ev["event_id"]] = ev
    return fresh


@app.command()
def watch(
    event_ids: Annotated[list[str] | None, typer.Argument(
        metavar="[ID]...", show_default=False, help="Events to follow.")] = None,
    watch_all: Annotated[bool, typer.Option(
        "--all", "-a", help="Also follow every event queued or running now, and those "
                            "created while watching.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Draw the table on stderr; print the ended events as JSON.")] = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Live table of events until every one has ended; Ctrl-C stops watching, not the jobs."""
    from rich.live import Live

    ids = list(dict.fromkeys(event_ids or []))
    if not ids and not watch_all:
        raise UsageError("name the events to watch (kvctl events watch ID ...) or pass --all")
    with connect(resolve(controller, timeout)) as client:
        try:
            events, seen = _initial(client, ids, watch_all)
        except UntrackedEvents as exc:
            output.note(exc.message)
            return
        if not events:
            output.note("no event is queued or running")
            if as_json:
                output.print_json([])
            return
        console = output.err() if as_json else output.out()
        try:
            with Live(output.events_table(events.values()), console=console,
                      auto_refresh=False) as live:
                while True:
                    pending = [i for i, ev in events.items() if ev.get("status") not in ENDED]
                    if not pending:
                        break
                    time.sleep(POLL_SECONDS)
                    for event_id in pending:
                        events[event_id] = client.event(event_id)
                    if watch_all:
                        events.update(_new_events(client, seen))
                    live.update(output.events_table(events.values()), refresh=True)
        except KeyboardInterrupt:
            raise KvctlError("stopped watching; the events keep running on the controller",
                             EXIT_INTERRUPTED) from None
    if as_json:
        output.print_json(list(events.values()))
    failed = [ev for ev in events.values() if ev.get("status") == "failed"]
    if failed:
        raise KvctlError("; ".join(f"event {ev['event_id']} failed: {ev.get('error')}"
                                   for ev in failed))


@app.command("list")
def list_events(
    status: Annotated[str | None, typer.Option(
        "--status", "-s", show_default=False,
        help=f"Only events in this state: {', '.join(STATUSES)}.")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", "-n", min=1, show_default=False, help="Only the N most recent.")] = None,
    as_json: JsonOpt = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """List recent events, oldest first."""
    if status is not None and status not in STATUSES:
        raise UsageError(f"--status must be one of {', '.join(STATUSES)}, got {status!r}")
    with connect(resolve(controller, timeout)) as client:
        events = client.events(status, limit)
    if as_json:
        output.print_json(events)
        return
    if not events:
        output.out().print("no events" + (f" with status {status}" if status else ""))
        return
    output.out().print(output.events_table(events))


@app.command()
def show(
    event_id: Annotated[str, typer.Argument(metavar="ID", help="Event id.")],
    as_json: JsonOpt = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Show one event: state, chunk progress, bytes before and after, error, timestamps."""
    with connect(resolve(controller, timeout)) as client:
        ev = client.event(event_id)
    if as_json:
        output.print_json(ev)
    else:
        output.out().print(output.event_details(ev))
