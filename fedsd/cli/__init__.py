"""The `fedsd` command line: the typer root (`fedsd.cli.main.main`) and one module per command group."""
