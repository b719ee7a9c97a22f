"""vsva: Intel VT-d virtual SVA as a multi-process actor system.

The installed package is one namespace. Its top level is this folder (`orchestrator/`:
runtimes, launching, audit, trace and the CLI); the modelled components are mounted as
`vsva.actors` (folder `actors/`) and the compiled translation path as `vsva.hotpath`
(folder `hotpath/`). pyproject.toml maps the folders to the package names.
"""


def __getattr__(name: str) -> str:
    """`vsva.__version__`, read when asked: importlib.metadata costs every process that
    imports vsva (the fork server, the CLI, an actor started without it) ~20 ms; only
    `vsva --version` needs it."""
    if name != "__version__":
        raise AttributeError(f"module 'vsva' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vsva")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"
