"""What a person sees on the console, and where the rest goes.

On the console (stderr): the entrypoint's own progress bars (embedlib.progress), warnings and errors,
and, where it asks for them, its own INFO lines (the miner's one-line summary of a pass). In the
run's log file, when there is one: everything at INFO and above, including what the libraries say
along the way: transformers' loading notices, DeepSpeed's configuration, deprecation warnings
(Python's `warnings`, captured once per place they come from). Progress bars of the libraries
(transformers' "Loading weights") are turned off: ours say what is going on.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_installed: list[logging.Handler] = []  # ours, so that a second call replaces rather than adds


class _ConsoleFilter(logging.Filter):
    """Deprecation and other library warnings are for the log file, not for a person at the console;
    INFO lines reach the console only from the loggers named in `info_from`."""

    def __init__(self, level: int, info_from: tuple[str, ...]):
        super().__init__()
        self.level, self.info_from = level, info_from

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            return False
        own = any(record.name == name or record.name.startswith(name + ".") for name in self.info_from)
        return record.levelno >= (min(self.level, logging.INFO) if own else self.level)


class _Stderr(logging.StreamHandler):
    """The current sys.stderr at every record (a test harness or a progress bar may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def route_logs(console_level: int = logging.WARNING, log_file: str | os.PathLike | None = None,
               info_from: tuple[str, ...] = ()) -> None:
    """Send log records at `console_level` and above to stderr (and INFO ones from the loggers in
    `info_from`, e.g. ("mining",)) and, with `log_file`, INFO and above to that file (appended). Call
    it again, e.g. once the run directory exists, to add the file."""
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed.clear()

    console = _Stderr()
    console.setFormatter(logging.Formatter(FORMAT))
    console.addFilter(_ConsoleFilter(console_level, info_from))
    _installed.append(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setLevel(logging.INFO)
        to_file.setFormatter(logging.Formatter(FORMAT))
        _installed.append(to_file)
    for handler in _installed:
        root.addHandler(handler)
    root.setLevel(logging.INFO if info_from or log_file is not None else console_level)

    logging.captureWarnings(True)
    warnings.simplefilter("default")  # each warning once per place it is raised from, not once per call
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Libraries that print on their own: through our handlers instead, without their progress bars."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        pass
    else:
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_info()  # filtered by our handlers' levels
    if "deepspeed" in sys.modules:  # importing it here would cost seconds; callers import it first
        from deepspeed.utils import logger as deepspeed_logger

        for handler in list(deepspeed_logger.handlers):  # its own handler prints to stdout
            deepspeed_logger.removeHandler(handler)
        deepspeed_logger.propagate = True
        deepspeed_logger.setLevel(logging.INFO)
