"""The `kvctl` root: wires the command modules together and owns error handling.

Nothing heavy is imported here: torch, transformers and uvicorn load inside the commands
that need them, so `kvctl --help` stays instant.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.exceptions import Abort, Exit, TyperException

from kvctl import __version__, output
from kvctl.commands import cache, cluster, events
from kvctl.commands.bench import bench
from kvctl.commands.inspect import inspect
from kvctl.commands.serve import serve
from kvctl.commands.tokenize import tokenize
from kvctl.errors import EXIT_FAILURE, EXIT_INTERRUPTED, KvctlError

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a killed writer


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout replaced by a test runner: nothing to redirect
        pass
    finally:
        os.close(devnull)


def _debug() -> bool:
    return os.environ.get("KVCTL_DEBUG") == "1"


class KvctlGroup(TyperGroup):
    """Turns KvctlError, Ctrl-C and unexpected exceptions into one stderr line + exit code.

    Done here rather than in `main()` so Typer's CliRunner (which calls the app, not main)
    sees exactly what a user sees.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (Exit, Abort, TyperException):
            raise
        except KvctlError as exc:
            if _debug():
                raise
            output.error(exc.message)
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:
            # `kvctl ... | head` closed our stdout: stop quietly, as `git log | head` does.
            _silence_stdout()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except KeyboardInterrupt:
            if _debug():
                raise
            output.error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if _debug():
                raise
            output.error(f"unexpected {type(exc).__name__}: {exc} (this is a kvctl bug; rerun "
                         "with KVCTL_DEBUG=1 for the traceback)")
            raise typer.Exit(EXIT_FAILURE) from None


app = typer.Typer(
    name="kvctl",
    cls=KvctlGroup,
    help="Compress and manage the KV caches of LLM serving clusters.",
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
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Compress and manage the KV caches of LLM serving clusters.

    Settings: flags > env (KVCTL_CONTROLLER, KVCTL_TIMEOUT, KVCTL_TOKENIZER,
    KVCTL_INSTANCE_ID) > the config file (kvctl config-path) > defaults.
    """


for fn in (cache.compress, cache.decompress):
    app.command(rich_help_panel="Cache")(fn)
app.add_typer(events.app, name="events", rich_help_panel="Cache")
for fn in (cache.lookup, cache.pin, cache.unpin, cache.move, cache.clear):
    app.command(rich_help_panel="Cache")(fn)
app.command(rich_help_panel="Cache")(inspect)
app.command(rich_help_panel="Tokens")(tokenize)
for fn in (cluster.health, cluster.workers, cluster.codecs):
    app.command(rich_help_panel="Cluster")(fn)
app.command(rich_help_panel="Server")(serve)
app.command(rich_help_panel="Server")(bench)


@app.command("config-path", rich_help_panel="Settings")
def config_path() -> None:
    """Print the path of the settings file.

    Keys: controller, timeout, tokenizer, instance_id (YAML).
    """
    from kvctl.settings import config_path as path

    typer.echo(str(path()))


def main() -> None:
    """Console-script entry point."""
    try:
        app(prog_name="kvctl")
    except BrokenPipeError:  # the root's own help, printed before any command runs
        _silence_stdout()
        sys.exit(EXIT_BROKEN_PIPE)
