"""Options shared by several commands, declared once (Annotated aliases).

A flag left at None means "not given", so settings.resolve can fall back to env and file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ControllerOpt = Annotated[str | None, typer.Option(
    "--controller", metavar="URL", show_default=False,
    help="Controller base URL. (env KVCTL_CONTROLLER; default http://localhost:9000)")]
TimeoutOpt = Annotated[float | None, typer.Option(
    "--timeout", metavar="SECONDS", show_default=False,
    help="HTTP timeout per request. (env KVCTL_TIMEOUT; default 30)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
TokenizerOpt = Annotated[str | None, typer.Option(
    "--tokenizer", "-t", metavar="TOKENIZER", show_default=False,
    help="smollm2 | llama3 | a .gguf file | a tokenizer.json | a directory | a hub id in the "
         "local cache. (env KVCTL_TOKENIZER; default smollm2, the model kvctl serve runs)")]
InstanceOpt = Annotated[str | None, typer.Option(
    "--instance-id", metavar="ID", show_default=False,
    help="LMCache instance. (env KVCTL_INSTANCE_ID; default lmcache_default_instance)")]
MethodOpt = Annotated[str, typer.Option(
    "--method", "-m", help="Codec (kvctl codecs lists them).")]
LocationOpt = Annotated[str, typer.Option(
    "--location", "-l", help="Storage location: LocalCPUBackend, LocalDiskBackend, "
                             "RemoteBackend.")]
WaitOpt = Annotated[bool, typer.Option(
    "--wait", "-w", help="Follow the event with a progress bar; exit 0 only if it finished.")]

PromptArg = Annotated[str | None, typer.Argument(
    metavar="[PROMPT]", show_default=False,
    help="Prompt text, tokenized locally; '-' reads it from stdin.")]
TokensOpt = Annotated[str | None, typer.Option(
    "--tokens", metavar="IDS", show_default=False,
    help="Token ids instead of a prompt: 1,2,3 (commas or spaces).")]
TokensFileOpt = Annotated[Path | None, typer.Option(
    "--tokens-file", metavar="FILE", show_default=False, dir_okay=False, allow_dash=True,
    help="File of token ids ('-' = stdin): 1,2,3 / whitespace-separated / a JSON list / "
         "vLLM's /tokenize reply.")]
