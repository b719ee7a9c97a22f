"""The `vsva` command line (`app`, a typer application) and the hot-path bench it runs."""
