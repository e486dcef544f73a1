"""Cache operations: compress, decompress, lookup, clear, pin, unpin, move."""

from __future__ import annotations

from typing import Annotated

import typer

from kvctl.commands._common import Operation, TokenInput, finish_op, run_operation
from kvctl.errors import EXIT_FAILURE, UsageError
from kvctl.options import (
    CacheSaltOpt,
    LocationOpt,
    MethodOpt,
    ModelNameOpt,
    PromptArg,
    TokensFileOpt,
    TokensOpt,
    WaitOpt,
    WorldSizeOpt,
)
from kvctl.output import kv_table
from kvctl.settings import DEFAULT_LOCATION, DEFAULT_METHOD
from kvctl.state import state


def compress(
    ctx: typer.Context,
    prompt: PromptArg = None,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    method: MethodOpt = DEFAULT_METHOD,
    location: LocationOpt = DEFAULT_LOCATION,
    wait: WaitOpt = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Also re-encode chunks another lossy codec already holds (their "
                        "losses add up); refused without it.")] = False,
) -> None:
    """Compress the stored KV of a prompt (or token ids) in a location.

    Nothing stored for the tokens: one line, exit 2 (nothing was done).
    """
    st = state(ctx)
    ids = TokenInput(prompt, tokens, tokens_file).ids(st)
    inst = st.instance_id()
    run_operation(st, Operation("compress", location, wait=wait, show_warning=force,
                                call=lambda c, t: c.compress(inst, method, location, t,
                                                             force=force)), ids)


def decompress(
    ctx: typer.Context,
    prompt: PromptArg = None,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    method: MethodOpt = DEFAULT_METHOD,
    location: LocationOpt = DEFAULT_LOCATION,
    wait: WaitOpt = False,
) -> None:
    """Decompress the stored KV of a prompt (or token ids) back to full precision.

    Nothing stored for the tokens: one line, exit 2 (nothing was done).
    """
    st = state(ctx)
    ids = TokenInput(prompt, tokens, tokens_file).ids(st)
    inst = st.instance_id()
    run_operation(st, Operation("decompress", location, wait=wait,
                                call=lambda c, t: c.decompress(inst, method, location, t)), ids)


def lookup(
    ctx: typer.Context,
    prompt: PromptArg = None,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    model_name: ModelNameOpt = None,
    world_size: WorldSizeOpt = 1,
    cache_salt: CacheSaltOpt = "",
) -> None:
    """Show where the longest stored prefix of a prompt's KV lives, tier by tier (exit 2 if
    nowhere).

    With --coordinator: every chunk's placements on the MP fleet, per instance and tier.
    """
    from kvctl.errors import Rejected

    st = state(ctx)
    ids = TokenInput(prompt, tokens, tokens_file).ids(st)
    if st.settings.coordinator:
        from kvctl.commands import fleet

        fleet.lookup(st, ids, model_name, world_size, cache_salt)
        return
    with st.client() as client:
        reply = client.lookup(ids)
    layout = reply.get("layout_info") or {}
    # kvctl's controller adds every tier holding the prefix; LMCache's names only the best
    tiers = reply.get("tiers") or {}
    rows = []
    for inst, (loc, matched) in layout.items():
        per_tier = tiers.get(inst) or {loc: matched}
        for tier, n in per_tier.items():
            rows.append((inst, tier, f"{n}/{len(ids)}", "best" if tier == loc else ""))
    st.out.result(reply, lambda: kv_table(rows, ("instance", "location", "matched tokens", ""))
                  if rows else None)
    if not layout:
        raise Rejected(f"nothing matched: no stored KV for any prefix of these {len(ids)} "
                       "tokens")


def clear(
    ctx: typer.Context,
    location: LocationOpt = DEFAULT_LOCATION,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")
                   ] = False,
    wait: WaitOpt = False,
) -> None:
    """Remove every chunk from a location (asks first unless --yes)."""
    st = state(ctx)
    s = st.settings
    inst = st.instance_id()
    if not yes:
        if not typer.confirm(f"Remove every chunk of {inst} in {location} at "
                             f"{s.controller}?", err=True, default=False):
            st.out.note("nothing removed")
            raise typer.Exit(EXIT_FAILURE)
    with st.client() as client:
        reply = client.clear(inst, location)
        finish_op(st, client, reply, wait, f"clear of {location} scheduled")


def pin(
    ctx: typer.Context,
    prompt: PromptArg = None,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    location: LocationOpt = DEFAULT_LOCATION,
    wait: WaitOpt = False,
    model_name: ModelNameOpt = None,
    world_size: WorldSizeOpt = 1,
    cache_salt: CacheSaltOpt = "",
) -> None:
    """Protect a prompt's stored KV from eviction (exit 2 if nothing is stored)."""
    st = state(ctx)
    ids = TokenInput(prompt, tokens, tokens_file).ids(st)
    if st.settings.coordinator:  # an MP fleet: pins are the coordinator's, fleet-wide
        from kvctl.commands import fleet

        fleet.pin(st, ids, model_name, world_size, cache_salt, unpin=False)
        return
    inst = st.instance_id()
    run_operation(st, Operation("pin", location, wait=wait,
                                call=lambda c, t: c.pin(inst, location, t)), ids)


def unpin(
    ctx: typer.Context,
    prompt: PromptArg = None,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    location: LocationOpt = DEFAULT_LOCATION,
    wait: WaitOpt = False,
    model_name: ModelNameOpt = None,
    world_size: WorldSizeOpt = 1,
    cache_salt: CacheSaltOpt = "",
) -> None:
    """Let a prompt's stored KV be evicted again (kvctl's server only)."""
    st = state(ctx)
    ids = TokenInput(prompt, tokens, tokens_file).ids(st)
    if st.settings.coordinator:  # an MP fleet: pins are the coordinator's, fleet-wide
        from kvctl.commands import fleet

        fleet.pin(st, ids, model_name, world_size, cache_salt, unpin=True)
        return
    inst = st.instance_id()
    run_operation(st, Operation("unpin", location, wait=wait,
                                call=lambda c, t: c.unpin(inst, location, t)), ids)


def move(
    ctx: typer.Context,
    prompt: PromptArg = None,
    to: Annotated[str | None, typer.Option(
        "--to", metavar="LOCATION", show_default=False,
        help="Destination location, e.g. LocalDiskBackend (required).")] = None,
    source: Annotated[str, typer.Option(
        "--from", metavar="LOCATION", help="Source location.")] = DEFAULT_LOCATION,
    to_instance: Annotated[str | None, typer.Option(
        "--to-instance", metavar="ID", show_default=False,
        help="Destination instance. \\[default: the source instance]")] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Keep the source chunks.")] = False,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    wait: WaitOpt = False,
) -> None:
    """Move (or --copy) a prompt's stored KV to another location."""
    if to is None:
        raise UsageError("move needs a destination: --to LOCATION")
    st = state(ctx)
    ids = TokenInput(prompt, tokens, tokens_file).ids(st)
    inst = st.instance_id()
    dest = to_instance or inst
    if (inst, source) == (dest, to):
        raise UsageError(f"source and destination are both {inst}/{to}")
    verb = "copy" if copy else "move"
    run_operation(st, Operation(f"{verb} {source} -> {to}", source, wait=wait,
                                call=lambda c, t: c.move((inst, source), (dest, to), t, copy)),
                  ids)
