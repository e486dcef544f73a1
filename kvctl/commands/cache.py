"""Cache operations: compress, decompress, lookup, clear, pin, unpin, move."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kvctl import output
from kvctl.commands._common import connect, finish_op, token_input
from kvctl.errors import UsageError
from kvctl.options import (
    ControllerOpt,
    InstanceOpt,
    JsonOpt,
    LocationOpt,
    MethodOpt,
    PromptArg,
    TimeoutOpt,
    TokenizerOpt,
    TokensFileOpt,
    TokensOpt,
    WaitOpt,
)
from kvctl.settings import DEFAULT_LOCATION, DEFAULT_METHOD, resolve


def _explain_coverage(reply: dict[str, Any], tokens: list[int], location: str) -> None:
    n = reply.get("num_tokens")
    if n == 0:
        output.warn(f"none of the {len(tokens)} tokens has stored KV in {location}: nothing "
                    "to do (has the engine served this prompt with this tokenizer? "
                    "`kvctl lookup` shows where a prompt's KV is)")
    elif isinstance(n, int) and n < len(tokens):
        output.note(f"{n} of {len(tokens)} tokens have stored KV in {location} (a stored "
                    "prefix, chunk by chunk); scheduling those")


def _transcode(op: str, prompt: str | None, tokens: str | None, tokens_file: Any,
               tokenizer: str | None, instance_id: str | None, method: str, location: str,
               wait: bool, as_json: bool, controller: str | None, timeout: float | None,
               force: bool = False) -> None:
    ids = token_input(prompt, tokens, tokens_file, tokenizer)
    s = resolve(controller, timeout, instance_id=instance_id)
    with connect(s) as client:
        if op == "compress":
            reply = client.compress(s.instance_id, method, location, ids, force=force)
        else:
            reply = client.decompress(s.instance_id, method, location, ids)
        _explain_coverage(reply, ids, location)
        if force and reply.get("num_tokens"):
            warning = client.event(reply["event_id"]).get("warning")
            if warning:
                output.warn(warning)
        finish_op(client, reply, wait, as_json, f"{op} of {len(ids)} tokens scheduled")


def compress(
    prompt: PromptArg = None,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    tokenizer: TokenizerOpt = None,
    instance_id: InstanceOpt = None,
    method: MethodOpt = DEFAULT_METHOD,
    location: LocationOpt = DEFAULT_LOCATION,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Also re-encode chunks another lossy codec already holds (their "
                        "losses add up); refused without it.")] = False,
) -> None:
    """Compress the stored KV of a prompt (or token ids) in a location."""
    _transcode("compress", prompt, tokens, tokens_file, tokenizer, instance_id, method,
               location, wait, as_json, controller, timeout, force)


def decompress(
    prompt: PromptArg = None,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    tokenizer: TokenizerOpt = None,
    instance_id: InstanceOpt = None,
    method: MethodOpt = DEFAULT_METHOD,
    location: LocationOpt = DEFAULT_LOCATION,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Decompress the stored KV of a prompt (or token ids) back to full precision."""
    _transcode("decompress", prompt, tokens, tokens_file, tokenizer, instance_id, method,
               location, wait, as_json, controller, timeout)


def lookup(
    prompt: PromptArg = None,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Show where the longest stored prefix of a prompt's KV lives, tier by tier."""
    ids = token_input(prompt, tokens, tokens_file, tokenizer)
    with connect(resolve(controller, timeout)) as client:
        reply = client.lookup(ids)
    if as_json:
        output.print_json(reply)
        return
    layout = reply.get("layout_info") or {}
    if not layout:
        output.out().print(f"no stored KV for any prefix of these {len(ids)} tokens")
        return
    # kvctl's controller adds every tier holding the prefix; LMCache's names only the best
    tiers = reply.get("tiers") or {}
    rows = []
    for inst, (loc, matched) in layout.items():
        per_tier = tiers.get(inst) or {loc: matched}
        for tier, n in per_tier.items():
            rows.append((inst, tier, f"{n}/{len(ids)}", "best" if tier == loc else ""))
    output.out().print(output.kv_table(rows, ("instance", "location", "matched tokens", "")))


def clear(
    instance_id: InstanceOpt = None,
    location: LocationOpt = DEFAULT_LOCATION,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")
                   ] = False,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Remove every chunk from a location (asks first unless --yes)."""
    s = resolve(controller, timeout, instance_id=instance_id)
    if not yes and not typer.confirm(
            f"Remove every chunk of {s.instance_id} in {location} at {s.controller}?",
            err=True):
        raise typer.Exit(1)
    with connect(s) as client:
        reply = client.clear(s.instance_id, location)
        finish_op(client, reply, wait, as_json, f"clear of {location} scheduled")


def _pin(unpin: bool, prompt: str | None, tokens: str | None, tokens_file: Any,
         tokenizer: str | None, instance_id: str | None, location: str, wait: bool,
         as_json: bool, controller: str | None, timeout: float | None) -> None:
    ids = token_input(prompt, tokens, tokens_file, tokenizer)
    s = resolve(controller, timeout, instance_id=instance_id)
    with connect(s) as client:
        call = client.unpin if unpin else client.pin
        reply = call(s.instance_id, location, ids)
        _explain_coverage(reply, ids, location)
        finish_op(client, reply, wait, as_json,
                  f"{'unpin' if unpin else 'pin'} of {len(ids)} tokens scheduled")


def pin(
    prompt: PromptArg = None,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    tokenizer: TokenizerOpt = None,
    instance_id: InstanceOpt = None,
    location: LocationOpt = DEFAULT_LOCATION,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Protect a prompt's stored KV from eviction."""
    _pin(False, prompt, tokens, tokens_file, tokenizer, instance_id, location, wait, as_json,
         controller, timeout)


def unpin(
    prompt: PromptArg = None,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    tokenizer: TokenizerOpt = None,
    instance_id: InstanceOpt = None,
    location: LocationOpt = DEFAULT_LOCATION,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Let a prompt's stored KV be evicted again (kvctl's server only)."""
    _pin(True, prompt, tokens, tokens_file, tokenizer, instance_id, location, wait, as_json,
         controller, timeout)


def move(
    prompt: PromptArg = None,
    to: Annotated[str | None, typer.Option(
        "--to", metavar="LOCATION", show_default=False,
        help="Destination location, e.g. LocalDiskBackend.")] = None,
    source: Annotated[str, typer.Option(
        "--from", metavar="LOCATION", help="Source location.")] = DEFAULT_LOCATION,
    to_instance: Annotated[str | None, typer.Option(
        "--to-instance", metavar="ID", show_default=False,
        help="Destination instance. [default: the source instance]")] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Keep the source chunks.")] = False,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    tokenizer: TokenizerOpt = None,
    instance_id: InstanceOpt = None,
    wait: WaitOpt = False,
    as_json: JsonOpt = False,
    controller: ControllerOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Move (or --copy) a prompt's stored KV to another location."""
    if to is None:
        raise UsageError("move needs a destination: --to LOCATION")
    ids = token_input(prompt, tokens, tokens_file, tokenizer)
    s = resolve(controller, timeout, instance_id=instance_id)
    dest_instance = to_instance or s.instance_id
    if (s.instance_id, source) == (dest_instance, to):
        raise UsageError(f"source and destination are both {s.instance_id}/{to}")
    with connect(s) as client:
        reply = client.move((s.instance_id, source), (dest_instance, to), ids, copy)
        _explain_coverage(reply, ids, source)
        finish_op(client, reply, wait, as_json,
                  f"{'copy' if copy else 'move'} {source} -> {to} of {len(ids)} tokens "
                  "scheduled")
