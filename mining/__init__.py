"""mining entrypoint."""
