"""The competition data layer: layout discovery, images, polygon JSON, multi-label masks, handedness.

Layout (the README's "Data format" section)::

    DIR/DCM/ID001/image1661130828152_R.png       8-bit grayscale PNG
    DIR/outputs_json/ID001/image1661130828152_R.json

A JSON is matched to its PNG by stem; the size always comes from the PNG, never from the JSON.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from handseg.common.constants import (
    ANNOTATION_SUFFIX,
    IMAGE_EXTENSIONS,
    IMAGES_DIR,
    LABELS_DIR,
)
from handseg.common.errors import HandsegError
from handseg.common.notices import notice


@dataclass(frozen=True)
class Sample:
    """One image of the data set (and its label file, where it has one)."""

    patient: str
    """The person the image belongs to: the first folder under ``DCM/`` (e.g. ``ID001``); folds keep
    a person's images together. An image with no folder is its own person (its stem)."""
    image_path: Path
    label_path: Path | None = None
    rel_dir: str | None = None
    """The image's folder relative to the image root, e.g. ``ID001`` (``""``: the root itself);
    ``None`` means the patient folder."""

    @property
    def stem(self) -> str:
        return self.image_path.stem

    @property
    def name(self) -> str:
        """The basename used in submissions, e.g. ``image1661319116107.png``."""
        return self.image_path.name

    @property
    def folder(self) -> str:
        """The image's folder relative to the image root (``ID040``, ``""`` for a flat folder)."""
        return self.patient if self.rel_dir is None else self.rel_dir

    @property
    def rel(self) -> str:
        """Path relative to ``DCM/`` (or to a plain folder), e.g. ``ID040/image1661319116107.png``;
        submissions sort by it."""
        return f"{self.folder}/{self.image_path.name}" if self.folder else self.image_path.name


LabelPolicy = Literal["required", "optional", "ignore"]
Role = Literal["train", "test", "test_gt"]


@dataclass(frozen=True)
class DataSource:
    """What a ``--data`` argument turned out to be."""

    root: Path
    """The folder the images are read from (holding ``DCM/`` in the competition layout)."""
    layout: Literal["competition", "folder"]
    note: str | None = None
    """Said to the user when ``--data`` was resolved to something other than itself."""


def is_image_file(path: Path) -> bool:
    """An X-ray file by its extension (any case): PNG, JPEG or DICOM."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def resolve_data(data_dir: str | Path, role: Role = "train") -> DataSource:
    """Turn what a user points ``--data`` at into the folder to read: a split holding ``DCM/``, the data
    set's root (``ROOT/train`` for training stages, ``ROOT/test`` for prediction), or, for prediction
    only, any folder of X-rays (PNG, JPEG or DICOM, flat or nested).

    Raises:
        HandsegError: the folder is missing, or holds nothing this role can read.
    """
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise HandsegError("data folder not found", data_dir)
    if not data_dir.is_dir():
        raise HandsegError("is a file; --data takes a folder", data_dir)
    if (data_dir / IMAGES_DIR).is_dir():
        return DataSource(data_dir, "competition")
    split = data_dir / role
    if (split / IMAGES_DIR).is_dir():
        return DataSource(split, "competition", f"{data_dir} is a data set's root: using {split} (its {role} split)")
    if role == "test" and any(is_image_file(p) for p in _walk_files(data_dir)):
        return DataSource(data_dir, "folder")
    others = [p for p in ("train", "test", "test_gt") if (data_dir / p / IMAGES_DIR).is_dir()]
    hint = f" (it holds {', '.join(str(data_dir / p) for p in others)})" if others else ""
    what = f"no {IMAGES_DIR}/ folder" + (" and no PNG, JPEG or DICOM images" if role == "test" else "")
    raise HandsegError(f"{what} here{hint}", data_dir)


def _walk_files(root: Path, skipped: list | None = None):
    """Files under ``root`` (symlinks included, dangling ones too), skipping hidden entries (``.DS_Store``,
    macOS ``._x.png`` copies, ``.git``); with ``skipped``, the hidden files are listed there."""
    seen: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # followed links lead back to a folder already walked
            raise HandsegError(f"symlink loop: this folder is {seen[st.st_dev, st.st_ino]} again", dirpath)
        seen[st.st_dev, st.st_ino] = dirpath
        if skipped is not None:
            skipped += [Path(dirpath) / d for d in dirnames if d.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name
            elif skipped is not None:
                skipped.append(Path(dirpath) / name)


def _check_name(rel: Path, root: Path) -> None:
    """An image's name goes into CSV rows, manifests and one-line errors: it must be UTF-8 text without line
    breaks or control characters (decided before any work; the name is shown escaped).

    Raises:
        HandsegError: naming ``root`` and the escaped name.
    """
    text = str(rel)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise HandsegError(f"the file name {ascii(text)} is not UTF-8 text; rename it", root) from None
    if not text.isprintable():
        raise HandsegError(f"the file name {ascii(text)} holds a line break or control character; rename it",
                           root)


OTHER_IMAGE_EXTENSIONS = (".tif", ".tiff", ".bmp", ".webp", ".jp2")


def _image_files(root: Path) -> list[Path]:
    """Every image file under ``root``; a broken link with an image name is an error naming it, and
    what is not read (hidden entries, images in formats handseg does not read) is said once."""

    images, skipped, other = [], [], []
    for path in _walk_files(root, skipped):
        if not is_image_file(path):
            if path.suffix.lower() in OTHER_IMAGE_EXTENSIONS:
                other.append(path)
            continue
        _check_name(path.relative_to(root), root)
        if not path.exists():
            raise HandsegError("broken link: the image it points to does not exist", path)
        if not path.is_file():
            raise HandsegError("not a regular file", path)
        images.append(path)
    if other:
        kinds = ", ".join(sorted({p.suffix.lower() for p in other}))
        notice(("other-images", str(root)), f"{len(other)} files of {root} are not read ({kinds}; handseg reads PNG, "
                                            f"JPEG and DICOM), e.g. {other[0]}")
    if skipped:
        notice(("hidden", str(root)), f"{len(skipped)} hidden files or folders under {root} are not read, e.g. "
                                      f"{skipped[0]}")
    return images


def discover(data_dir: str | Path, labels: LabelPolicy = "optional", role: Role = "train") -> list[Sample]:
    """List the images of a data folder in submission order (sorted by path relative to ``DCM/``).

    Args:
        data_dir: what ``--data`` points at (see :func:`resolve_data`): a folder holding ``DCM/`` and,
            for labelled data, ``outputs_json/``; a data set's root; or, for ``role="test"``, any
            folder of PNG/JPEG/DICOM X-rays.
        labels: ``required``: every image must have a JSON (and every JSON an image);
            ``optional``: use JSONs where present; ``ignore``: do not look for them.
        role: which split of a data set's root to read (``train``, ``test``, or ``test_gt`` for
            labelled test images).

    Raises:
        HandsegError: the folder holds no images, an image file is a broken link, or images and
            labels do not match.
    """
    source = resolve_data(data_dir, role)
    if source.note:

        notice(("data", str(source.root)), source.note)  # which split of a data set's root was read
    data_dir = source.root
    image_root = data_dir / IMAGES_DIR if source.layout == "competition" else data_dir
    images = _image_files(image_root)
    if not images:
        raise HandsegError(f"no PNG, JPEG or DICOM images under {image_root.name}/", data_dir)
    rels = [p.relative_to(image_root) for p in images]

    label_root = data_dir / LABELS_DIR
    use_labels = source.layout == "competition" and labels != "ignore" and (labels == "required"
                                                                            or label_root.is_dir())
    if labels == "required" and not label_root.is_dir():
        raise HandsegError(f"no {LABELS_DIR}/ folder: these images have no labels", data_dir)
    label_files = {}
    if use_labels:
        for label in _walk_files(label_root):
            if label.suffix.lower() == ANNOTATION_SUFFIX:
                key = (label.parent.relative_to(label_root).as_posix(), label.stem)
                label_files[key] = label

    samples, seen = [], {}
    for image, rel in zip(images, rels):
        folder = rel.parent.as_posix()
        folder = "" if folder == "." else folder
        if (folder, image.stem) in seen:
            raise HandsegError(f"two images share the name {image.stem} ({seen[folder, image.stem].name} and "
                               f"{image.name}); labels and caches could not tell them apart", image.parent)
        seen[folder, image.stem] = image
        patient = rel.parts[0] if len(rel.parts) > 1 else image.stem
        label = label_files.pop((folder, image.stem), None) if use_labels else None
        if label is None and labels == "required":
            expected = label_root / folder / (image.stem + ANNOTATION_SUFFIX)
            raise HandsegError(f"image has no label file (expected {expected})", image)
        samples.append(Sample(patient, image, label, folder))
    if label_files:
        orphan = sorted(label_files.values())[0]
        raise HandsegError(f"label file has no matching image under {IMAGES_DIR}/ "
                           f"({len(label_files)} such file(s))", orphan)
    samples.sort(key=lambda s: s.rel)
    return samples
