"""The `kvctl` root: global options, one state per invocation, and error handling.

Nothing heavy is imported here: torch, transformers, tokenizers and uvicorn load inside the
commands that need them, so `kvctl --help` and a failing `kvctl compress` stay fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.exceptions import Abort, Exit, TyperException

from kvctl import __version__
from kvctl.commands import cache, cluster, events, fleet
from kvctl.commands import config as config_cmd
from kvctl.commands.bench import bench
from kvctl.commands.inspect import inspect
from kvctl.commands.serve import serve
from kvctl.commands.tokenize import tokenize
from kvctl.commands.worker import worker
from kvctl.commands.workers import workers
from kvctl.common.defaults import debug
from kvctl.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_CODES_HELP,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    GLOBAL_OPTIONS_HELP,
    KvctlError,
)
from kvctl.output import Output
from kvctl.settings import (
    DEFAULT_CONTROLLER,
    DEFAULT_INSTANCE_ID,
    DEFAULT_TIMEOUT,
    DEFAULT_TOKENIZER,
    Flags,
)
from kvctl.state import State

_option_type = TyperOption.display_type_rich


def _help_type(self: TyperOption, ctx: typer.Context) -> str | None:
    # Typer's help prints "<bool>" beside every flag, which takes no value
    return None if self.is_flag else _option_type(self, ctx)


# ... and "<str>" beside every argument, whose metavar already names it
TyperOption.display_type_rich = _help_type  # type: ignore[method-assign]
TyperArgument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout replaced by a test runner: nothing to redirect
        pass
    finally:
        os.close(devnull)


def _on_broken_pipe(self: Console) -> None:
    # Rich's default exits 1 when stdout is gone (help and tables go through Rich); kvctl
    # exits 141 for every closed stdout, as a shell reports a writer killed by SIGPIPE.
    self.quiet = True
    _silence_stdout()
    raise SystemExit(EXIT_BROKEN_PIPE)


Console.on_broken_pipe = _on_broken_pipe  # type: ignore[method-assign]


def _debug() -> bool:
    return debug()


def _option_names(cmd: Any) -> dict[str, bool]:
    """Option name -> whether it takes a value, for the non-eager options of ``cmd``."""
    names: dict[str, bool] = {}
    for p in cmd.params:
        if getattr(p, "param_type_name", None) == "option" and not p.is_eager:
            for name in (*p.opts, *p.secondary_opts):
                names[name] = not p.is_flag and not p.count
    return names


def _is_group(cmd: Any) -> bool:
    return hasattr(cmd, "get_command") and hasattr(cmd, "list_commands")


class KvctlGroup(TyperGroup):
    """The root command.

    - Global options may follow the subcommand (`kvctl events list --json --controller U`):
      `parse_args` moves them in front of it, unless that subcommand has an option of the
      same name itself (`kvctl bench --json`), in which case they go to the subcommand.
    - KvctlError, Ctrl-C and unexpected exceptions become one stderr line and an exit code
      (done here rather than in `main()` so Typer's CliRunner sees what a user sees).
    """

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self._hoist(ctx, list(args)))

    def _hoist(self, ctx: typer.Context, args: list[str]) -> list[str]:
        glob = _option_names(self)
        # walk the root's own options, then the subcommand path (events -> watch)
        i, cmd = 0, self
        while i < len(args):
            tok = args[i]
            if tok == "--":
                return args
            if tok.startswith("-"):
                takes = glob.get(tok.split("=", 1)[0]) if cmd is self else None
                i += 2 if takes and "=" not in tok else 1
                continue
            sub = cmd.get_command(ctx, tok) if _is_group(cmd) else None
            if sub is None:
                break
            cmd, i = sub, i + 1
            if not _is_group(cmd):
                break
        if cmd is self:
            return args
        own = _option_names(cmd)
        head, tail, moved, to_leaf = args[:i], [], [], []
        j = i
        while j < len(args):
            tok = args[j]
            if tok == "--":
                tail += args[j:]
                break
            name = tok.split("=", 1)[0]
            if name in glob and name not in own:
                n = 2 if glob[name] and "=" not in tok else 1
                moved += args[j:j + n]
                j += n
                continue
            tail.append(tok)
            j += 1
        # a global option given before a subcommand that has its own option of that name
        root_part = []
        k = 0
        while k < len(head):
            tok = head[k]
            name = tok.split("=", 1)[0]
            if tok.startswith("-") and name in glob:
                n = 2 if glob[name] and "=" not in tok else 1
                (to_leaf if name in own else root_part).extend(head[k:k + n])
                k += n
                continue
            root_part.append(tok)
            k += 1
        return [*moved, *root_part, *to_leaf, *tail]

    def invoke(self, ctx: Any) -> Any:
        out = Output()  # an error is one stderr line whatever the output mode
        try:
            return super().invoke(ctx)
        except (Exit, Abort, TyperException):
            raise
        except KvctlError as exc:
            if _debug():
                raise
            out.error(exc.message)
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:
            # `kvctl ... | head` closed our stdout: stop quietly, as `git log | head` does.
            _silence_stdout()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except KeyboardInterrupt:
            if _debug():
                raise
            out.error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if _debug():
                raise
            out.error(f"unexpected {type(exc).__name__}: {exc} (this is a kvctl bug; rerun "
                      "with KVCTL_DEBUG=1 for the traceback)")
            raise typer.Exit(EXIT_FAILURE) from None


app = typer.Typer(
    name="kvctl",
    cls=KvctlGroup,
    help="Compress and manage the KV caches of LLM serving clusters.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kvctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    controller: Annotated[str | None, typer.Option(
        "--controller", metavar="URL", show_default=False, rich_help_panel="Global options",
        help=f"Controller base URL or host:port. \\[env KVCTL_CONTROLLER; default "
             f"{DEFAULT_CONTROLLER}]")] = None,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", metavar="SECONDS", show_default=False, rich_help_panel="Global options",
        help=f"HTTP timeout per request. \\[env KVCTL_TIMEOUT; default {DEFAULT_TIMEOUT:g}]")
    ] = None,
    tokenizer: Annotated[str | None, typer.Option(
        "--tokenizer", "-t", metavar="TOKENIZER", show_default=False,
        rich_help_panel="Global options",
        help="Tokenizer for PROMPT arguments: smollm2 | gemma3 | llama3 | a .gguf file | a "
             "tokenizer.json | a directory | a hub id in the local cache. \\[env "
             f"KVCTL_TOKENIZER; default {DEFAULT_TOKENIZER}, the model kvctl serve runs]")
    ] = None,
    instance_id: Annotated[str | None, typer.Option(
        "--instance-id", metavar="ID", show_default=False, rich_help_panel="Global options",
        help="LMCache instance. \\[env KVCTL_INSTANCE_ID; default: the only instance "
             f"registered with the controller, else {DEFAULT_INSTANCE_ID}]")
    ] = None,
    coordinator: Annotated[str | None, typer.Option(
        "--coordinator", metavar="URL", show_default=False, rich_help_panel="Global options",
        help="LMCache MP coordinator (kvctl serve --coordinator-port, or lmcache "
             "coordinator): lookup, pin and unpin ask it instead of the controller. \\[env "
             "KVCTL_COORDINATOR; default none]")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", rich_help_panel="Global options",
        help="Print results as JSON on stdout (errors stay one line on stderr).")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Compress and manage the KV caches of LLM serving clusters.

    Global options go before or after the command. Settings: flag > env > the config file
    (kvctl config path) > default; `kvctl config show` prints what is in effect.
    """
    ctx.obj = State(flags=Flags(controller=controller, timeout=timeout, tokenizer=tokenizer,
                                instance_id=instance_id, coordinator=coordinator),
                   out=Output(json=as_json))


# Rich reflows an epilog: the blank line keeps the two sentences apart
EPILOG = f"{GLOBAL_OPTIONS_HELP}\n\n{EXIT_CODES_HELP}"
for fn in (cache.compress, cache.decompress):
    app.command(rich_help_panel="Cache", epilog=EPILOG)(fn)
app.add_typer(events.app, name="events", rich_help_panel="Cache")
for fn in (cache.lookup, cache.pin, cache.unpin, cache.move, cache.clear):
    app.command(rich_help_panel="Cache", epilog=EPILOG)(fn)
app.command(rich_help_panel="Cache", epilog=EPILOG)(inspect)
app.command(rich_help_panel="Tokens", epilog=GLOBAL_OPTIONS_HELP)(tokenize)
for fn in (cluster.health, workers, cluster.codecs):
    app.command(rich_help_panel="Cluster", epilog=EPILOG)(fn)
for fn in (fleet.instances, fleet.delete, fleet.prefetch):
    app.command(rich_help_panel="MP fleet", epilog=EPILOG)(fn)
app.command(rich_help_panel="Server")(serve)
app.command(rich_help_panel="Server")(worker)
app.command(rich_help_panel="Server")(bench)
app.add_typer(config_cmd.app, name="config", rich_help_panel="Settings")


@app.command("config-path", hidden=True)
def config_path(ctx: typer.Context) -> None:
    """Print the path of the settings file (the older spelling of `kvctl config path`)."""
    config_cmd.path(ctx)


def main() -> None:
    """Console-script entry point."""
    try:
        app(prog_name="kvctl")
    except BrokenPipeError:  # the root's own help, printed before any command runs
        _silence_stdout()
        sys.exit(EXIT_BROKEN_PIPE)
