"""Everything that is not the modelled system: runtimes, launching, audit, trace and the CLI."""
