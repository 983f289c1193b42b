"""Domain constants: the one place where the classes, the Dice epsilon and the threshold are spelt out."""

from __future__ import annotations

CLASSES: tuple[str, ...] = (
    *(f"finger-{i}" for i in range(1, 20)),
    "Trapezium",
    "Trapezoid",
    "Capitate",
    "Hamate",
    "Scaphoid",
    "Lunate",
    "Triquetrum",
    "Pisiform",
    "Radius",
    "Ulna",
)
"""The 29 classes in competition order (finger-1..19, eight carpals, radius, ulna)."""

NUM_CLASSES: int = len(CLASSES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

DICE_EPS: float = 1e-4
"""Smoothing in the leaderboard Dice: (2|y&p| + eps) / (|y| + |p| + eps)."""

DEFAULT_THRESHOLD: float = 0.5
"""Probability above which a pixel is foreground (the leaderboard's sigmoid > 0.5)."""

CARPALS: tuple[str, ...] = CLASSES[19:27]
WRIST_CLASSES: tuple[str, ...] = CLASSES[19:]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")  # DICOM: handseg[dicom]
"""X-ray files by extension, matched in any case."""
DEFAULT_MAX_PIXELS = 8192 * 8192
"""Images above this many pixels are refused unless ``HANDSEG_MAX_PIXELS`` says otherwise."""
ANNOTATION_SUFFIX = ".json"
IMAGES_DIR = "DCM"
LABELS_DIR = "outputs_json"
CSV_COLUMNS: tuple[str, str, str] = ("image_name", "class", "rle")

MAX_WEIGHT_SUM = 1e6
"""The largest sum of ensemble weights (they are relative: only their ratios matter). Beyond it a soft
vote's level (sum of w x 255 q) leaves the exact integers it is counted in, or overflows to inf."""
