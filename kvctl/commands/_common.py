"""Helpers the command modules share: settings, token input, following events."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from kvctl import output
from kvctl.client import ENDED, ControllerClient, UntrackedEvents
from kvctl.errors import EXIT_INTERRUPTED, KvctlError, UsageError
from kvctl.settings import Settings, resolve

POLL_SECONDS = 0.2


def connect(s: Settings) -> ControllerClient:
    return ControllerClient.from_settings(s)


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
    if prompt == "-":
        text = sys.stdin.read()
        # a trailing newline from `echo` is not part of the prompt
        return text[:-1] if text.endswith("\n") else text
    return prompt


def tokenize(text: str, spec: str | None) -> list[int]:
    """Token ids of ``text`` with the tokenizer ``spec`` (settings decide the default)."""
    from kvctl.common.tokenizers import TokenizerError, encode_prompt, load_tokenizer

    spec = resolve(tokenizer=spec).tokenizer if spec is None else spec
    try:
        with output.err().status(f"loading tokenizer {spec or 'smollm2'}…"):
            tok = load_tokenizer(spec)
    except TokenizerError as exc:
        raise KvctlError(str(exc)) from None
    return encode_prompt(tok, text)


def token_input(prompt: str | None, tokens: str | None, tokens_file: Path | None,
                tokenizer: str | None) -> list[int]:
    """The token ids a command acts on, from exactly one of its three sources."""
    given = [n for n, v in (("PROMPT", prompt), ("--tokens", tokens),
                            ("--tokens-file", tokens_file)) if v is not None]
    if len(given) != 1:
        raise UsageError("give the tokens one way: a PROMPT (or '-' for stdin), --tokens "
                         "1,2,3, or --tokens-file FILE" +
                         (f" (got {' and '.join(given)})" if given else ""))
    if tokens is not None:
        return parse_token_ids(tokens)
    if tokens_file is not None:
        if str(tokens_file) == "-":
            return parse_token_ids(sys.stdin.read(), "stdin")
        try:
            text = tokens_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--tokens-file: cannot read {tokens_file}: {exc.strerror}"
                             ) from None
        return parse_token_ids(text, str(tokens_file))
    assert prompt is not None
    text = read_prompt(prompt)
    if not text:
        raise UsageError("the prompt is empty")
    return tokenize(text, tokenizer)


def wait_for(client: ControllerClient, reply: dict[str, Any], progress: bool = True
             ) -> dict[str, Any]:
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
    console = output.err()
    # no terminal, no bar: a redirected stderr would only collect blank lines
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("chunks"), TimeElapsedColumn(), console=console,
                   transient=True, disable=not (progress and console.is_terminal))
    try:
        with bar:
            task = bar.add_task(output.escape(f"{event_id} queued"), total=None)
            while True:
                try:
                    ev = client.event(event_id)
                except UntrackedEvents as exc:
                    output.note(exc.message)
                    return {"event_id": event_id, "status": "finished",
                            "num_tokens": reply.get("num_tokens"), "tracked": False}
                total = ev.get("chunks_total")
                bar.update(task, total=total or None, completed=ev.get("chunks_done", 0),
                           description=output.escape(f"{event_id} {ev.get('status')}"))
                if ev.get("status") in ENDED:
                    return ev
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        raise KvctlError(f"stopped waiting; event {event_id} keeps running on the controller "
                         f"(kvctl events watch {event_id})", EXIT_INTERRUPTED) from None


def report_event(ev: dict[str, Any], as_json: bool) -> None:
    """Print an ended event; a failed one becomes exit 1 with its error."""
    if as_json:
        output.print_json(ev)
    else:
        output.out().print(output.event_details(ev))
    if ev.get("status") != "finished":
        raise KvctlError(f"event {ev.get('event_id')} {ev.get('status')}: "
                         f"{ev.get('error') or 'no error given'}")


def finish_op(client: ControllerClient, reply: dict[str, Any], wait: bool, as_json: bool,
              what: str) -> None:
    """Common tail of the mutating commands: print the reply, or follow the event."""
    if wait:
        report_event(wait_for(client, reply), as_json)
        return
    if as_json:
        output.print_json(reply)
        return
    output.out().print(f"{output.escape(what)}: event [bold]{output.escape(str(reply['event_id']))}"
                       f"[/] ({reply.get('num_tokens', '?')} tokens)", soft_wrap=True)
    if reply.get("num_tokens"):
        output.note(f"follow it with: kvctl events watch {reply['event_id']}")
