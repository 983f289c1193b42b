"""Short names for inputs: teams name every output ``submission.csv``, so an input is labelled by the
shortest end of its path that no other input shares (``a/submission.csv``, ``b/submission.csv``)."""

from __future__ import annotations

import os
from pathlib import Path


def distinct_labels(paths: list[Path | str]) -> list[str]:
    """The shortest path suffix of each path that tells it apart from the others.

    Args:
        paths: the inputs, as given (relative paths are taken from the working folder, so
            ``pred.csv`` and ``a/pred.csv`` become ``b/pred.csv`` and ``a/pred.csv`` when run in ``b/``).

    Returns:
        One label per path, in order: its file name where that is unique, else as many trailing
        folders as it takes (``/``-separated); a path given twice gets its whole path.
    """
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    labels = []
    for i, own in enumerate(parts):
        others = [p for j, p in enumerate(parts) if j != i]
        for k in range(1, len(own) + 1):
            if all(p[-k:] != own[-k:] for p in others):
                labels.append("/".join(own[-k:]))
                break
        else:
            labels.append(str(paths[i]))
    return labels
