"""`python -m infq.cli` runs the CLI."""

from infq.cli.app import main

main()
