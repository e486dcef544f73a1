"""Helpers the command modules share: token input, scheduling an operation, following it."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvctl.client import ENDED, ControllerClient, UntrackedEvents
from kvctl.errors import EXIT_INTERRUPTED, KvctlError, Rejected, UsageError
from kvctl.output import escape, short_id
from kvctl.state import State

POLL_SECONDS = 0.2


def parse_token_ids(text: str, source: str = "--tokens") -> list[int]:
    """Ids from ``1,2,3``, whitespace-separated ids, a JSON list or a /tokenize reply."""
    text = text.strip()
    if not text:
        raise UsageError(f"{source}: no token ids")
    if text[0] in "[{":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{source}: invalid JSON ({exc})") from None
        if isinstance(data, dict):
            data = data.get("tokens")
        if not isinstance(data, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in data):
            raise UsageError(f"{source}: expected a JSON list of integers or an object with "
                             "a 'tokens' list")
        ids = data
    else:
        try:
            ids = [int(p) for p in text.replace(",", " ").split()]
        except ValueError:
            raise UsageError(f"{source}: token ids are integers separated by commas or "
                             "spaces") from None
    if not ids:
        raise UsageError(f"{source}: no token ids")
    if any(t < 0 for t in ids):
        raise UsageError(f"{source}: token ids cannot be negative")
    return ids


def read_prompt(prompt: str) -> str:
    """The prompt text; ``-`` reads stdin exactly as it is, a final newline included: a
    prompt file sent to the engine had it too, and its tokens count."""
    if prompt == "-":
        return sys.stdin.read()
    return prompt


def tokenize(st: State, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer the settings name."""
    from kvctl.common.tokenizers import TokenizerError, load_tokenizer

    spec = st.settings.tokenizer
    try:
        with st.out.status(f"loading tokenizer {spec}…"):
            tok = load_tokenizer(spec)
    except TokenizerError as exc:
        raise KvctlError(str(exc)) from None
    return tok.encode(text)


@dataclass(frozen=True)
class TokenInput:
    """The three ways a command is given its tokens; exactly one must be used."""

    prompt: str | None = None
    tokens: str | None = None
    tokens_file: Path | None = None

    def ids(self, st: State) -> list[int]:
        given = [n for n, v in (("PROMPT", self.prompt), ("--tokens", self.tokens),
                                ("--tokens-file", self.tokens_file)) if v is not None]
        if len(given) != 1:
            raise UsageError("give the tokens one way: a PROMPT (or '-' for stdin), --tokens "
                             "1,2,3, or --tokens-file FILE" +
                             (f" (got {' and '.join(given)})" if given else ""))
        if self.tokens is not None:
            return parse_token_ids(self.tokens)
        if self.tokens_file is not None:
            if str(self.tokens_file) == "-":
                return parse_token_ids(sys.stdin.read(), "stdin")
            try:
                text = self.tokens_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"--tokens-file: cannot read {self.tokens_file}: "
                                 f"{exc.strerror}") from None
            return parse_token_ids(text, str(self.tokens_file))
        assert self.prompt is not None
        text = read_prompt(self.prompt)
        if not text:
            raise UsageError("the prompt is empty")
        return tokenize(st, text)


@dataclass(frozen=True)
class Operation:
    """One token-driven operation to schedule: what it is called in messages, where the
    stored KV must be, and the client call that schedules it."""

    what: str
    location: str
    call: Callable[[ControllerClient, list[int]], dict[str, Any]]
    wait: bool = False
    # with --wait, print the ended event's warning (compress --force: chunks that another
    # lossy codec went through); without, `kvctl events show` has it
    show_warning: bool = False


def run_operation(st: State, op: Operation, ids: list[int]) -> None:
    """Schedule ``op`` on ``ids``; nothing stored for them is a one-line rejection (exit 2).
    """
    with st.client() as client:
        reply = op.call(client, ids)
        n = reply.get("num_tokens")
        if n == 0:
            if st.out.json:
                st.out.print_json(reply)
            raise Rejected(f"nothing matched: none of the {len(ids)} tokens has stored KV in "
                           f"{op.location} for {st.instance_id()}, so nothing was "
                           f"scheduled (`kvctl lookup` shows where a prompt's KV is)")
        if isinstance(n, int) and n < len(ids):
            st.out.note(f"{n} of {len(ids)} tokens have stored KV in {op.location} (a stored "
                        "prefix, chunk by chunk); scheduling those")
        finish_op(st, client, reply, op.wait, f"{op.what} of {len(ids)} tokens scheduled",
                  op.show_warning)


def wait_for(st: State, client: ControllerClient, reply: dict[str, Any]) -> dict[str, Any]:
    """Poll an event until it ends; a progress bar on stderr meanwhile. Returns the event.

    A controller that does not track events (upstream LMCache) finished the work before it
    answered: say so and return what is known, marked finished.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    event_id = str(reply["event_id"])
    console = st.out.err_console()
    # no terminal, no bar: a redirected stderr would only collect blank lines
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("chunks"), TimeElapsedColumn(), console=console,
                   transient=True, disable=not console.is_terminal)
    last: dict[str, Any] = {}

    def step() -> bool:
        try:
            ev = client.event(event_id)
        except UntrackedEvents:
            st.out.note(f"the controller at {client.base_url} does not track events "
                        "(upstream LMCache's): it finished the operation before it "
                        f"answered, so event {event_id} already ended")
            last.update(event_id=event_id, status="finished",
                        num_tokens=reply.get("num_tokens"), tracked=False)
            return True
        bar.update(task, total=ev.get("chunks_total") or None,
                   completed=ev.get("chunks_done", 0),
                   description=escape(f"{event_id} {ev.get('status')}"))
        last.clear()
        last.update(ev)
        return ev.get("status") in ENDED

    with bar:
        task = bar.add_task(escape(f"{event_id} queued"), total=None)
        poll_until(step, f"stopped waiting; event {event_id} keeps running on the controller "
                         f"(kvctl events watch {event_id})")
    return last


def poll_until(step: Callable[[], bool], interrupted: str) -> None:
    """Call ``step`` every POLL_SECONDS until it returns True: how every command follows
    events. Ctrl-C stops the following, never the jobs: ``interrupted`` says so (exit 130).
    """
    try:
        while not step():
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        raise KvctlError(interrupted, EXIT_INTERRUPTED) from None


def report_event(st: State, ev: dict[str, Any]) -> None:
    """Print an ended event; a failed one becomes exit 1 with its error."""
    from kvctl.output import event_details

    st.out.result(ev, lambda: event_details(ev))
    if ev.get("status") != "finished":
        raise KvctlError(f"event {ev.get('event_id')} {ev.get('status')}: "
                         f"{ev.get('error') or 'no error given'}")


def finish_op(st: State, client: ControllerClient, reply: dict[str, Any], wait: bool,
              what: str, show_warning: bool = False) -> None:
    """Common tail of the mutating commands: print the reply, or follow the event (and
    print its warning, which the job sets when it runs: compress --force)."""
    if wait:
        ev = wait_for(st, client, reply)
        if show_warning and ev.get("warning"):
            st.out.warn(str(ev["warning"]))
        report_event(st, ev)
        return
    event_id = str(reply["event_id"])
    st.out.result(reply, lambda: None)
    if not st.out.json:
        st.out.markup(f"{escape(what)}: event [bold]{escape(event_id)}[/] "
                      f"({escape(str(reply.get('num_tokens', '?')))} tokens)")
        st.out.note(f"follow it with: kvctl events watch {short_id(event_id)}")
