"""`python -m shitu_cli` runs the CLI."""

from shitu_cli.cli import main

main()
