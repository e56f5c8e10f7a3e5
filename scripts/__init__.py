"""Scripts that drive the entrypoints as subprocesses (the quickstart; bench/ uses their launch helpers)."""
