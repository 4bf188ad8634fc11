"""`python -m infq` runs the CLI."""

from infq.cli.app import main

main()
