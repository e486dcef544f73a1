"""`kvctl config`: where the settings file is, and the settings in effect."""

from __future__ import annotations

import typer

from kvctl.output import kv_table
from kvctl.settings import config_path
from kvctl.state import state

app = typer.Typer(help="Settings: the config file and the values in effect.",
                  no_args_is_help=True)


@app.command()
def show(ctx: typer.Context) -> None:
    """The effective settings and where each comes from (flag, env, file, default)."""
    st = state(ctx)
    rows = st.settings.as_rows()
    data = {"config_file": str(config_path()),
            "settings": {k: {"value": v, "source": src} for k, v, src in rows}}
    st.out.result(data, lambda: kv_table(rows, ("setting", "value", "source")))
    if not st.out.json:
        exists = "" if config_path().is_file() else " (not present)"
        st.out.note(f"config file: {config_path()}{exists}")


@app.command()
def path(ctx: typer.Context) -> None:
    """Print the path of the settings file (keys: controller, timeout, tokenizer,
    instance_id, auth_token; YAML)."""
    st = state(ctx)
    p = config_path()
    st.out.result({"config_file": str(p), "exists": p.is_file()}, lambda: str(p))
