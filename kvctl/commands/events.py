"""`kvctl events`: watch, list and show the controller's tracked events.

Ids: the full id, or any unambiguous prefix of it or of its random part (the short id the
tables show); the controller resolves prefixes.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kvctl.client import ControllerClient
from kvctl.commands._common import poll_until
from kvctl.common.events import ENDED, STATUSES
from kvctl.errors import GLOBAL_OPTIONS_HELP, KvctlError, UsageError
from kvctl.output import event_details, events_table
from kvctl.state import state

app = typer.Typer(help="Follow compress/decompress/move/... events on the controller. "
                       "An id can be shortened to any unambiguous prefix.",
                  epilog=GLOBAL_OPTIONS_HELP, no_args_is_help=True)



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
        ev = client.event(event_id)  # a prefix comes back as the full id
        events[str(ev.get("event_id", event_id))] = ev
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
    ctx: typer.Context,
    event_ids: Annotated[list[str] | None, typer.Argument(
        metavar="ID...", show_default=False, help="Events to follow (ids or prefixes).")
    ] = None,
    watch_all: Annotated[bool, typer.Option(
        "--all", "-a", help="Also follow every event queued or running now, and those "
                            "created while watching.")] = False,
) -> None:
    """Live table of events until every one has ended; Ctrl-C stops watching, not the jobs.

    With --json the table goes to stderr and the ended events to stdout as JSON. Exit 1 if
    an event failed or cannot be followed (a controller that does not track events).
    """
    from rich.live import Live

    st = state(ctx)
    ids = list(dict.fromkeys(event_ids or []))
    if not ids and not watch_all:
        raise UsageError("name the events to watch (kvctl events watch ID ...) or pass --all")
    with st.client() as client:
        events, seen = _initial(client, ids, watch_all)
        if not events:
            st.out.note("no event is queued or running")
            st.out.result([], lambda: None)
            return
        console = st.out.err_console() if st.out.json else st.out.out_console()

        def pending() -> list[str]:
            return [i for i, ev in events.items() if ev.get("status") not in ENDED]

        def step() -> bool:
            for event_id in pending():
                events[event_id] = client.event(event_id)
            if watch_all:
                events.update(_new_events(client, seen))
            live.update(events_table(events.values()), refresh=True)
            return not pending()

        with Live(events_table(events.values()), console=console, auto_refresh=False) as live:
            if pending():
                poll_until(step, "stopped watching; the events keep running on the controller")
        if not console.is_terminal:
            # Live leaves its last frame without a final newline when it is not drawing on
            # a terminal: a file or a pipe gets a last line like any other
            console.line()
    st.out.result(list(events.values()), lambda: None)
    failed = [ev for ev in events.values() if ev.get("status") == "failed"]
    if failed:
        raise KvctlError("; ".join(f"event {ev['event_id']} failed: {ev.get('error')}"
                                   for ev in failed))


@app.command("list")
def list_events(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(
        "--status", "-s", metavar="STATE", show_default=False,
        help=f"Only events in this state: {', '.join(STATUSES)}.")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", "-n", min=1, metavar="N", show_default=False,
        help="Only the N most recent.")] = None,
    instance: Annotated[str | None, typer.Option(
        "--instance", "-i", metavar="ID", show_default=False,
        help="Only events of this instance.")] = None,
    method: Annotated[str | None, typer.Option(
        "--method", "-m", metavar="METHOD", show_default=False,
        help="Only events with this method (kivi-2), or any level of a codec (kivi).")
    ] = None,
) -> None:
    """List recent events, oldest first, with short ids, instance and error."""
    if status is not None and status not in STATUSES:
        raise UsageError(f"--status must be one of {', '.join(STATUSES)}, got {status!r}")
    for flag, value in (("--instance", instance), ("--method", method)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag} needs a value, got an empty string")
    st = state(ctx)
    with st.client() as client:
        events = client.events(status, limit, instance, method)
    wanted = ", ".join(f"{k} {v}" for k, v in (("status", status), ("instance", instance),
                                                ("method", method)) if v)
    st.out.result(events, lambda: events_table(events, wide=True,
                                               width=st.out.out_console().width) if events else
                  "no events" + (f" with {wanted}" if wanted else ""))


@app.command()
def show(
    ctx: typer.Context,
    event_id: Annotated[str, typer.Argument(metavar="ID", help="Event id or a prefix of it.")],
) -> None:
    """Show one event: state, chunk progress, bytes before and after, error, timestamps."""
    st = state(ctx)
    with st.client() as client:
        ev = client.event(event_id)
    st.out.result(ev, lambda: event_details(ev))
