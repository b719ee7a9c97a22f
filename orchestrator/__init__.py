"""vsva: Intel VT-d virtual SVA as a multi-process actor system.

The installed package is one namespace. Its top level is this folder (`orchestrator/`:
runtimes, launching, audit, trace and the CLI); the modelled components are mounted as
`vsva.actors` (folder `actors/`) and the compiled translation path as `vsva.hotpath`
(folder `hotpath/`). pyproject.toml maps the folders to the package names.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vsva")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
