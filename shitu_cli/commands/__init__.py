"""One module per subcommand; each defines `command`, a thin Typer function over the core."""
