"""Scores that people look at: comparisons of CSVs with each other or with ground truth.

Reading and checking the inputs (:func:`read_compare_inputs`) is kept apart from the scoring
(:func:`score_comparison`), so that a command validates everything before it starts any work or
shows any progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from handseg.analysis.metrics import DiceReport, dice_scores
from handseg.common.constants import CLASSES
from handseg.common.errors import HandsegError
from handseg.common.paths import distinct_labels
from handseg.data.images import image_size
from handseg.data.labels import class_runs, read_polygons
from handseg.data.layout import Sample, discover
from handseg.formats.submission import PredictionSet, check_fits, check_same_images, read_predictions


@dataclass
class CompareInputs:
    """CSVs read and checked, and what is known about their images, before any scoring."""

    csvs: list[Path]
    sets: list[PredictionSet]
    gt_dir: Path | None = None
    data_dir: Path | None = None
    samples: dict[str, Sample] = field(default_factory=dict)
    """Image name -> its sample (X-ray path, patient), from ``--gt`` or ``--data``; empty without either."""
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Image name -> ``(H, W)`` from the PNG header, for every image of the CSVs when samples are known."""


@dataclass
class Comparison:
    """Each CSV scored against one reference (the first CSV, or ground truth)."""

    reference: str
    reference_set: PredictionSet
    gt_dir: Path | None
    names: list[str]
    sets: list[PredictionSet]
    reports: list[DiceReport]
    samples: dict[str, Sample] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    """Each compared CSV's shortest distinct path suffix (``a/submission.csv``), as tables and reports head it."""
    reference_label: str = ""

    def __post_init__(self) -> None:
        if not self.labels:
            self.labels = distinct_labels(self.names)
        self.reference_label = self.reference_label or self.reference

    def to_json(self) -> dict:
        """The scores as ``compare --json`` writes them: ``reference``, ``classes``, the first compared CSV's
        scores at the top level (:func:`result_json`), and every compared CSV's under ``results``
        keyed by its path; one schema for any number of CSVs (``handseg compare --help`` shows it)."""
        results = {name: {**result_json(name, report), "label": label}
                   for name, label, report in zip(self.names, self.labels, self.reports)}
        return {"reference": self.reference, "classes": list(CLASSES), **results[self.names[0]], "results": results}


def empty_words(label: str, report: DiceReport) -> str | None:
    """What a table or report says of a CSV with classes it never predicts, or None: a Dice of 1 there
    means only that the reference is empty too."""
    empty = report.empty_classes
    if not empty:
        return None
    if len(empty) == len(CLASSES):
        return f"{label} predicts no pixel at all (empty masks): its scores say nothing about a model"
    return (f"{label} predicts no pixel of {len(empty)} class{'es' if len(empty) != 1 else ''} "
            f"({', '.join(empty)}) on any image")


def result_json(name: str, report: DiceReport) -> dict:
    """One compared CSV's scores: mean, per class, per image, and per image and class (6 decimals)."""
    per_image = report.dice.mean(axis=1)
    return {"csv": name, "mean_dice": report.mean_dice, "per_class": report.per_class,
            "empty_classes": report.empty_classes, "reference_empty_classes": report.reference_empty_classes,
            "per_image": {image: float(v) for image, v in zip(report.images, per_image)},
            "per_image_class": {image: [round(float(v), 6) for v in row]
                                for image, row in zip(report.images, report.dice)}}


def _by_name(samples: list[Sample], folder: Path, wanted: set[str] | None = None) -> dict[str, Sample]:
    """Samples keyed by image name; two images with one name are an error where a CSV names them."""
    out: dict[str, Sample] = {}
    for s in samples:
        if s.name in out and (wanted is None or s.name in wanted):
            raise HandsegError(f"two images are named {s.name} ({out[s.name].rel}, {s.rel}); CSV rows could not "
                               "tell them apart", folder)
        out.setdefault(s.name, s)
    return out


def read_compare_inputs(csvs: list[Path | PredictionSet], gt_dir: Path | None = None,
                        data_dir: Path | None = None) -> CompareInputs:
    """Read and check CSVs for a comparison: same images everywhere, and every run inside its image.

    Args:
        csvs: prediction CSVs (or sets already read, e.g. a CV's out-of-fold predictions together); without
            ``gt_dir`` the first is the reference.
        gt_dir: a labelled folder to score against (its PNGs give the sizes).
        data_dir: the folder of the X-rays (``DCM/`` layout), for sizes and overlays, without labels.

    Raises:
        HandsegError: a CSV is malformed or given twice, the image sets differ, an image is not in
            the data folder, or an RLE runs past the end of its image.
    """
    if gt_dir is not None and data_dir is not None:
        raise HandsegError("give --gt (labelled images) or --data (images only), not both")
    seen: dict[Path, Path] = {}
    for p in csvs:
        p = p.path if isinstance(p, PredictionSet) else p
        key = Path(p).resolve()
        if key in seen:
            raise HandsegError(f"CSV given twice ({seen[key]} and {p})", p)
        seen[key] = Path(p)
    # a PredictionSet is taken as read: the runs of a CV, their out-of-fold CSVs together
    sets = [p if isinstance(p, PredictionSet) else read_predictions(p) for p in csvs]
    inputs = CompareInputs([Path(s.path) for s in sets], sets, gt_dir, data_dir)
    if gt_dir is not None:
        inputs.samples = _by_name(discover(gt_dir, labels="required", role="test_gt"), gt_dir)
        truth = PredictionSet(Path(gt_dir), images=list(inputs.samples))
        for s in sets:
            check_same_images(truth, s)
    else:
        for s in sets[1:]:
            check_same_images(sets[0], s)
        if data_dir is not None:
            wanted = set(sets[0].images)
            inputs.samples = _by_name(discover(data_dir, labels="ignore", role="test"), data_dir, wanted)
            missing = [image for image in sets[0].images if image not in inputs.samples]
            if missing:
                raise HandsegError(f"{len(missing)} image(s) of the CSV are not under {Path(data_dir) / 'DCM'} "
                                   f"(e.g. {missing[0]})", sets[0].path)
            inputs.samples = {image: inputs.samples[image] for image in sets[0].images}
    inputs.shapes = {name: image_size(s.image_path) for name, s in inputs.samples.items()}
    for s in sets:
        check_fits(s, inputs.shapes)
    return inputs


def score_comparison(inputs: CompareInputs, progress: Callable[..., None] | None = None) -> Comparison:
    """Score checked inputs: each CSV against the ground truth, or the first CSV against the others.

    ``progress(total=n)`` is called once, then ``progress()`` per image and scoring.
    """
    sets = inputs.sets
    if inputs.gt_dir is not None:
        others, names, ref_name = sets, [str(p) for p in inputs.csvs], str(inputs.gt_dir)
    else:
        others, names, ref_name = sets[1:], [str(p) for p in inputs.csvs[1:]], str(inputs.csvs[0])
    n = len(sets[0].images)
    if progress is not None:
        progress(total=n * (len(others) + (inputs.gt_dir is not None)))
    if inputs.gt_dir is not None:
        reference = PredictionSet(Path(inputs.gt_dir), shapes=dict(inputs.shapes))
        for name, s in inputs.samples.items():
            reference.images.append(name)
            reference.runs[name] = class_runs(read_polygons(s.label_path), inputs.shapes[name])
            if progress is not None:
                progress()
    else:
        reference = sets[0]
    reports = [dice_scores(reference, s, progress) for s in others]
    labels = distinct_labels(inputs.csvs)  # the reference CSV too: its name must differ from the others'
    # the runs of a CV are no file: their name ("unet/resnet34@512 out-of-fold") is their label
    labels = [lab if Path(p).is_file() else str(p) for lab, p in zip(labels, inputs.csvs)]
    ref_label = str(inputs.gt_dir) if inputs.gt_dir is not None else labels[0]
    return Comparison(ref_name, reference, inputs.gt_dir, names, others, reports, inputs.samples, inputs.shapes,
                      labels[len(labels) - len(names):], ref_label)


def compare_predictions(csvs: list[Path], gt_dir: Path | None = None, progress: Callable[..., None] | None = None,
                        data_dir: Path | None = None) -> Comparison:
    """Score CSVs: against ``gt_dir``'s labels if given, else the first CSV against the others.

    Raises:
        HandsegError: see :func:`read_compare_inputs`.
    """
    return score_comparison(read_compare_inputs(csvs, gt_dir, data_dir), progress)
