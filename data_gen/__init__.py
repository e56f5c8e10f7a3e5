"""data_gen entrypoint."""
