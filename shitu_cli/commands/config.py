"""`shitu config set|get|unset|show`: defaults such as the gallery index, kept in a small YAML file."""

from __future__ import annotations

import typer

from shitu_cli import render

app = typer.Typer(help="User settings (the default index for `shitu predict`, the default rec model for `shitu build-index`, "
                       "a model mirror); SHITU_<KEY> env vars override them.",
                  no_args_is_help=True)


@app.command("set")
def set_command(
    key: str = typer.Argument(..., help="A setting name (see `shitu config show`)."),
    value: str = typer.Argument(..., help="Its value; paths are stored absolute."),
) -> None:
    """Store a setting in the config file."""
    from shitu_cli.settings import config_path, set_setting

    stored = set_setting(key, value)
    render.show(f"{key} = {stored.value}  ({config_path()})")
    if stored.note:
        render.warn(stored.note)


@app.command("get")
def get_command(
    key: str = typer.Argument(..., help="A setting name."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document (value and where it came from)."),
) -> None:
    """Print a setting's value (empty if unset), so `$(shitu config get index)` works in scripts."""
    from shitu_cli.settings import get_setting

    current = get_setting(key)
    if json_output:
        render.print_json(current)
    else:
        render.show(current.value or "")


@app.command("unset")
def unset_command(key: str = typer.Argument(..., help="A setting name.")) -> None:
    """Remove a setting from the config file."""
    from shitu_cli.settings import unset_setting

    current = unset_setting(key)
    render.show(f"{key} unset" + (f" (still set by {current.source})" if current.value else ""))


@app.command("show")
def show_command(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Show every setting, its value and where it came from (env, config or default)."""
    from shitu_cli.settings import all_settings, config_path

    values = all_settings()
    if json_output:
        render.print_json({"config_file": config_path(), "settings": values})
        return
    rows = [(v.key, v.value or "", v.source, v.help) for v in values]
    render.show(render.table(f"Settings ({config_path()})", ["key", "value", "source", "meaning"], rows))
