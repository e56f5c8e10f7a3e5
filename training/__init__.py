"""training entrypoint."""
