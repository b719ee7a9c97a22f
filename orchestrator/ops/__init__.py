"""Operating runs: topologies and topology files, the launcher of actor processes, the
controller that drives a session, the supervisor of `vsva up`, fault scenarios, the demo."""
