"""Prediction / submission CSVs: ``image_name,class,rle``, one row per image and class.

Rows are ordered by image (sorted by path relative to ``DCM/``) and, within an image, by the 29
classes in competition order. Reading is strict: a malformed RLE, unknown class, duplicate or
missing row is an error that names the file and the line.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from handseg.common.constants import CLASS_INDEX, CLASSES, CSV_COLUMNS, NUM_CLASSES
from handseg.common.errors import HandsegError
from handseg.formats.files import atomic_open, sidecar_manifest_path
from handseg.formats.rle import Runs, check_runs_fit, rle_to_runs, runs_to_rle

# a noisy 2048 x 2048 mask can have an RLE of megabytes; the csv module stops at 128 KiB by default
csv.field_size_limit(2**31 - 1)


@dataclass
class PredictionSet:
    """All runs of one CSV: ``runs[image_name][class_index]`` in the file's image order."""

    path: Path | None
    images: list[str] = field(default_factory=list)
    runs: dict[str, list[Runs]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Image sizes, where known (ground truth read from a labelled folder); a CSV does not carry them."""

    def __len__(self) -> int:
        return len(self.images)

    def rle(self, image: str, class_index: int) -> str:
        return runs_to_rle(self.runs[image][class_index])


def read_predictions(path: str | Path) -> PredictionSet:
    """Read and validate a prediction CSV.

    Raises:
        HandsegError: the file is missing, has the wrong header, or a row is malformed, has an
            unknown class or a bad RLE, repeats an (image, class) pair; or an image lacks classes.
    """
    path = Path(path)
    if not path.is_file():
        raise HandsegError("CSV not found", path)
    result = PredictionSet(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise HandsegError("empty file (expected header image_name,class,rle)", path)
            if tuple(h.strip() for h in header) != CSV_COLUMNS:
                raise HandsegError(f"header is {','.join(header)!r}, expected 'image_name,class,rle'", path)
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if len(row) != 3:
                    raise HandsegError(f"line {line}: expected 3 fields, got {len(row)}", path)
                image, name, rle = row
                index = CLASS_INDEX.get(name)
                if index is None:
                    raise HandsegError(f"line {line}: unknown class {name!r}", path)
                if not image:
                    raise HandsegError(f"line {line}: empty image_name", path)
                slots = result.runs.get(image)
                if slots is None:
                    slots = result.runs[image] = [None] * NUM_CLASSES  # type: ignore[list-item]
                    result.images.append(image)
                if slots[index] is not None:
                    raise HandsegError(f"line {line}: duplicate row for {image} / {name}", path)
                try:
                    slots[index] = rle_to_runs(rle)
                except ValueError as e:
                    raise HandsegError(f"line {line} ({image} / {name}): malformed RLE: {e}", path) from None
    except UnicodeDecodeError:
        raise HandsegError("not a UTF-8 text CSV", path) from None
    except csv.Error as e:
        raise HandsegError(f"not a valid CSV ({e})", path) from None
    for image in result.images:
        missing = [CLASSES[c] for c, r in enumerate(result.runs[image]) if r is None]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise HandsegError(f"{image} is missing {len(missing)} class row(s): {shown} (truncated file?)", path)
    if not result.images:
        raise HandsegError("no prediction rows", path)
    return result


def write_predictions(path: str | Path, rows: Iterable[tuple[str, list[str]]]) -> int:
    """Write a CSV atomically from ``(image_name, [29 RLE strings])`` in the order given.

    Returns the number of images written.
    """
    count = 0
    # its old manifest goes as the new CSV comes: the manifest written after it always describes it
    with atomic_open(path, "w", retire=sidecar_manifest_path(path), newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for image, rles in rows:
            if len(rles) != NUM_CLASSES:
                raise ValueError(f"{image}: expected {NUM_CLASSES} RLEs, got {len(rles)}")
            writer.writerows((image, name, rle) for name, rle in zip(CLASSES, rles))
            count += 1
    return count


def union_predictions(sets: list[PredictionSet], path: Path) -> PredictionSet:
    """Disjoint prediction sets as one, e.g. the out-of-fold CSVs of a cross-validation (each fold's
    held-out images): images in the order given, named ``path``.

    Raises:
        HandsegError: an image is in two of the sets (the same fold given twice?).
    """
    out = PredictionSet(path)
    where: dict[str, Path | None] = {}
    for s in sets:
        for image in s.images:
            if image in where:
                raise HandsegError(f"{image} is predicted in both {where[image]} and {s.path} (the same fold "
                                   "twice?)", s.path)
            where[image] = s.path
            out.images.append(image)
            out.runs[image] = s.runs[image]
        out.shapes.update(s.shapes)
    return out


def check_same_images(reference: PredictionSet, other: PredictionSet, what: str = "image sets") -> None:
    """Raise a HandsegError naming both files if two CSVs do not cover the same images."""
    a, b = set(reference.images), set(other.images)
    if a != b:
        only_a, only_b = sorted(a - b), sorted(b - a)
        detail = []
        if only_a:
            detail.append(f"{len(only_a)} only in {reference.path} (e.g. {only_a[0]})")
        if only_b:
            detail.append(f"{len(only_b)} only in {other.path} (e.g. {only_b[0]})")
        raise HandsegError(f"different {what}: " + "; ".join(detail), other.path)


def check_fits(pred: PredictionSet, shapes: dict[str, tuple[int, int]]) -> None:
    """Check that every prediction's runs fit the size of its image (``shapes`` from :func:`ground_truth`)."""
    for image in pred.images:
        if image in shapes:
            for c, runs in enumerate(pred.runs[image]):
                check_runs_fit(runs, shapes[image], f"{pred.path} ({image} / {CLASSES[c]})")
