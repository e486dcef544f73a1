"""LMCache MP fleets, through a coordinator (kvctl's or `lmcache coordinator`): instances,
lookup, pin, unpin, delete, prefetch."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from kvctl.commands._common import TokenInput
from kvctl.coordinator_client import CoordinatorClient
from kvctl.errors import EXIT_INTERRUPTED, KvctlError, Rejected, UsageError
from kvctl.options import (
    CacheSaltOpt,
    ModelNameOpt,
    PromptArg,
    TokensFileOpt,
    TokensOpt,
    WorldSizeOpt,
)
from kvctl.output import escape, fmt_bytes, kv_table
from kvctl.state import State, state

CHUNK = 256  # every LMCache MP server's chunk size; a shorter tail has no key
POLL_SECONDS = 0.2


def _model(model_name: str | None) -> str:
    if not model_name:
        raise UsageError("an MP fleet keys chunks by model: pass --model-name NAME (the model "
                         "name the servers store under) or set KVCTL_MODEL_NAME")
    return model_name


def _no_chunk(n: int) -> Rejected:
    return Rejected(f"nothing to do: {n} tokens is less than one {CHUNK}-token chunk, and "
                    "LMCache keys whole chunks only")


# ----------------------------------------------------------------- shared by cache.py ----
def lookup(st: State, ids: list[int], model_name: str | None, world_size: int,
           cache_salt: str) -> None:
    """Placements per chunk, instance and tier of a prompt's KV (exit 2 if nowhere)."""
    model = _model(model_name)
    with st.coordinator("kvctl lookup --coordinator") as c:
        kind = c.kind()
        reply = c.lookup(ids, model, world_size, cache_salt)
    results = reply.get("results") or []
    rows = []
    for i, res in enumerate(results):
        for p in res.get("placements") or []:
            rows.append((i, res["key"]["chunk_hash_hex"][:12], p["instance_id"], p["tier"],
                         p["backend"], fmt_bytes(p["size_bytes"])))
    prefix = 0
    for res in results:
        if not res.get("placements"):
            break
        prefix += 1
    st.out.result({**reply, "coordinator": kind, "prefix_chunks": prefix},
                  lambda: kv_table(rows, ("chunk", "hash", "instance", "tier", "backend",
                                          "size")) if rows else None)
    if not reply.get("chunks"):
        raise _no_chunk(len(ids))
    if not rows:
        raise Rejected(f"nothing matched: no instance holds any of the {reply['chunks']} "
                       f"chunks of these {len(ids)} tokens for model {model!r}")
    if not st.out.json:
        st.out.note(f"{prefix} of {reply['chunks']} chunks stored from the start "
                    f"({prefix * CHUNK} of {len(ids)} tokens)")


def pin(st: State, ids: list[int], model_name: str | None, world_size: int, cache_salt: str,
        unpin: bool = False) -> None:
    model = _model(model_name)
    verb = "unpin" if unpin else "pin"
    with st.coordinator(f"kvctl {verb} --coordinator") as c:
        reply = (c.unpin if unpin else c.pin)(ids, model, world_size, cache_salt)
    st.out.result(reply, lambda: f"{reply.get('status')}: {reply.get('affected')} keys of "
                                 f"{reply.get('requested')} chunks")
    if not reply.get("requested"):
        raise _no_chunk(len(ids))


# ---------------------------------------------------------------------- commands ----
def _cell(v: Any) -> str:
    return "-" if v is None else str(v)


def instances(ctx: typer.Context) -> None:
    """List the MP servers of a coordinator: liveness, usage per tier, ingest state."""
    st = state(ctx)
    with st.coordinator("kvctl instances") as c:
        kind = c.kind()
        regs = c.instances()
        usage = c.usage()
        ingest = c.ingest()
    by_usage = {u["instance_id"]: u for u in usage.get("instances", [])}
    by_ingest = {r["instance_id"]: r for r in (ingest or {}).get("instances", [])}
    out = []
    for inst in regs:
        iid = inst["instance_id"]
        row: dict[str, Any] = {**inst, "modules": by_usage.get(iid, {}).get("modules", [])}
        if iid in by_ingest:
            row.update({k: by_ingest[iid][k] for k in ("alive", "heartbeat_age_s", "cursor")})
        out.append(row)
    data = {"coordinator": kind, "url": c.base_url, "instances": out,
            "shared_modules": usage.get("shared_modules", [])}
    if ingest is not None:
        data.update({k: ingest[k] for k in ("keys", "max_keys", "dropped_entries",
                                             "unregistered", "state")})

    def table() -> Any:
        rows = []
        for r in out:
            tiers = {m["tier"]: m for m in r["modules"]}
            l1, l2 = tiers.get("l1"), tiers.get("l2")
            cur = r.get("cursor") or {}
            state_ = ("alive" if r.get("alive") else "dead") if "alive" in r else "registered"
            rows.append((r["instance_id"], f"{r['ip']}:{r['http_port']}", state_,
                         _cell(r.get("heartbeat_age_s")),
                         f"{fmt_bytes(l1['used_bytes'])}/{fmt_bytes(l1['capacity_bytes'])}"
                         if l1 else "-", fmt_bytes(l2["used_bytes"]) if l2 else "-",
                         _cell(cur.get("last_seq")), _cell(cur.get("gaps")),
                         _cell(cur.get("duplicates")), _cell(cur.get("stale"))))
        return kv_table(rows, ("instance", "address", "state", "hb age s", "l1 used/cap",
                               "l2 used", "last seq", "gaps", "dups", "stale"))
    st.out.result(data, table)
    if not st.out.json:
        if ingest is None:
            st.out.note(f"{c.base_url} is upstream's `lmcache coordinator`: it keeps ingest "
                        "state (seq, gaps, duplicates) to itself")
        else:
            st.out.note(f"{ingest['keys']} keys of at most {ingest['max_keys']}; "
                        f"{ingest['dropped_entries']} store entries dropped at the limit, "
                        f"{ingest['unregistered']} batches from unregistered instances")


InstanceOpt = Annotated[str | None, typer.Option(
    "--instance", metavar="ID", show_default=False, help="The MP server (kvctl instances).")]


def delete(
    ctx: typer.Context,
    prompt: PromptArg = None,
    instance: InstanceOpt = None,
    tier: Annotated[str, typer.Option(
        "--tier", metavar="TIER", help="l1, l2 or all.")] = "all",
    force: Annotated[bool, typer.Option(
        "--force", help="Also delete locked L1 chunks and L2 chunks the coordinator "
                        "pinned (their pins go too).")] = False,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    model_name: ModelNameOpt = None,
    world_size: WorldSizeOpt = 1,
    cache_salt: CacheSaltOpt = "",
) -> None:
    """Delete a prompt's chunks on one MP server, from L1, L2 or both (--coordinator)."""
    if tier not in ("l1", "l2", "all"):
        raise UsageError(f"--tier must be l1, l2 or all (got {tier!r})")
    if not instance:
        raise UsageError("delete acts on one MP server: pass --instance ID (kvctl instances)")
    st = state(ctx)
    model = _model(model_name)
    ids = TokenInput(prompt, tokens, tokens_file).ids(st)
    with st.coordinator("kvctl delete") as c:
        reply = c.delete(instance, ids, model, tier, force, world_size, cache_salt)
    st.out.result(reply, lambda: f"{reply.get('status')} on {reply.get('instance_id')}: "
                                 f"{reply.get('affected')} keys removed, {reply.get('skipped')}"
                                 f" skipped, of {reply.get('requested')} chunks")
    if reply.get("status") == "noop":
        raise _no_chunk(len(ids))
    if reply.get("skipped") and not st.out.json:
        st.out.note("skipped keys are locked (L1) or pinned (L2): --force deletes them too")


def prefetch(
    ctx: typer.Context,
    prompt: PromptArg = None,
    instance: InstanceOpt = None,
    wait: Annotated[bool, typer.Option(
        "--wait", "-w", help="Poll until the server finished; exit 0 only if it did.")
    ] = False,
    tokens: TokensOpt = None,
    tokens_file: TokensFileOpt = None,
    model_name: ModelNameOpt = None,
    world_size: WorldSizeOpt = 1,
    cache_salt: CacheSaltOpt = "",
) -> None:
    """Load a prompt's chunks from L2 into one MP server's L1 (--coordinator)."""
    if not instance:
        raise UsageError("prefetch acts on one MP server: pass --instance ID "
                         "(kvctl instances)")
    st = state(ctx)
    model = _model(model_name)
    ids = TokenInput(prompt, tokens, tokens_file).ids(st)
    with st.coordinator("kvctl prefetch") as c:
        reply = c.prefetch(instance, ids, model, world_size, cache_salt)
        if reply.get("status") == "noop" or not reply.get("request_id"):
            st.out.result(reply, lambda: None)
            raise _no_chunk(len(ids))
        if wait:
            reply = {**reply, **_wait(st, c, instance, str(reply["request_id"]))}
    st.out.result(reply, lambda: f"prefetch {reply.get('request_id')} on {instance}: "
                                 f"{reply.get('status')}" + (
                                     f" ({reply['found_keys']}/{reply['total_keys']} found)"
                                     if "found_keys" in reply else ""))
    if wait and reply.get("status") != "completed":
        raise KvctlError(f"prefetch {reply.get('request_id')} ended {reply.get('status')}")
    if not wait and not st.out.json:
        st.out.note(f"poll it: kvctl prefetch ... --wait, or GET /cache/prefetches/"
                    f"{escape(instance)}/{reply.get('request_id')}")


def _wait(st: State, c: CoordinatorClient, instance: str, request_id: str) -> dict[str, Any]:
    """The server's status once it is no longer pending (it forgets the job then)."""
    try:
        with st.out.status(f"prefetch {request_id} pending…"):
            while True:
                s = c.prefetch_status(instance, request_id)
                if s.get("status") != "pending":
                    return s
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        raise KvctlError(f"stopped waiting; prefetch {request_id} goes on on {instance}",
                         EXIT_INTERRUPTED) from None
