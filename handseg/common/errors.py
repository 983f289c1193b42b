"""The user-facing error type: a sentence that names the file and what is wrong."""

from __future__ import annotations

from pathlib import Path


class HandsegError(Exception):
    """A user mistake or bad input. The CLI prints it as one line and exits with code 2."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.message = message
        super().__init__(f"{path}: {message}" if path is not None else message)


def one_line(message: str) -> str:
    """The message of an error raised in a DataLoader worker (torch wraps it as "Caught HandsegError in
    DataLoader worker process 0. Original Traceback ..."): the original sentence, without the
    worker's traceback."""
    if "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    for prefix in ("handseg.common.errors.HandsegError: ", "HandsegError: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


JSON_TOO_DEEP = "nested too deeply to read (arrays or objects inside each other hundreds of levels deep)"
"""What a JSON file nested past the parser's recursion limit is called (instead of a RecursionError)."""
