"""The runtimes that drive actors: `sim` (deterministic, one process, for tests and explore)
and the ZeroMQ process runtime (`loop`, with `endpoints`, `peers` and `trace_buffer`;
`actor_process` is the child entry point the launcher starts)."""
