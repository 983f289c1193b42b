"""Synthetic hand radiographs in the competition layout, for the demo and the tests.

Each image is a posterior-anterior view of one hand drawn from a simple anatomical model: five rays
(metacarpal and phalanges) fanning from the distal carpal row, eight carpals in two rows (the
trapezium overlapping the trapezoid and the pisiform overlapping the triquetrum, as in the real
labels), radius and ulna. Each hand varies in size, finger spread and flexion, rotation and
in-plane wrist bend; left hands are mirror images. Rendering adds soft tissue, cortical rims,
trabecular texture, blur, noise, side markers, and now and then a ring or nail art.

The labels are the polygons themselves (dense, about one pixel apart), so the masks
(``cv2.fillPoly``) match the rendered bones exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handseg.common.constants import CLASSES, IMAGES_DIR, LABELS_DIR
from handseg.data.labels import Polygons, polygon_document
from handseg.formats.files import atomic_open, atomic_write_bytes, atomic_write_json

# Canonical right hand, PA view, in units of the image size: x to the right, y down.
# rays: (class names tip -> base, base point, direction in degrees from "up", positive = to the
# image right, segment lengths base -> tip, segment widths base -> tip)
_RAYS = (
    (("finger-1", "finger-2", "finger-3"), (0.386, 0.622), -38.0, (0.125, 0.085, 0.060), (0.032, 0.028, 0.022)),
    (("finger-4", "finger-5", "finger-6", "finger-7"), (0.437, 0.602), -9.0,
     (0.185, 0.105, 0.062, 0.046), (0.028, 0.026, 0.022, 0.019)),
    (("finger-8", "finger-9", "finger-10", "finger-11"), (0.477, 0.598), -1.0,
     (0.180, 0.115, 0.072, 0.048), (0.029, 0.027, 0.023, 0.019)),
    (("finger-12", "finger-13", "finger-14", "finger-15"), (0.516, 0.604), 7.0,
     (0.165, 0.108, 0.068, 0.045), (0.026, 0.025, 0.021, 0.018)),
    (("finger-16", "finger-17", "finger-18", "finger-19"), (0.552, 0.616), 16.0,
     (0.148, 0.085, 0.050, 0.040), (0.024, 0.022, 0.019, 0.016)),
)
# carpals: centre, semi-axes, rotation in degrees. Overlaps as in the real labels.
_CARPALS = {
    "Trapezium": ((0.394, 0.651), (0.023, 0.017), -30.0),
    "Trapezoid": ((0.428, 0.638), (0.018, 0.017), 0.0),
    "Capitate": ((0.474, 0.643), (0.020, 0.032), 5.0),
    "Hamate": ((0.521, 0.646), (0.023, 0.026), -10.0),
    "Scaphoid": ((0.421, 0.703), (0.028, 0.016), 35.0),
    "Lunate": ((0.468, 0.703), (0.020, 0.019), 0.0),
    "Triquetrum": ((0.514, 0.694), (0.021, 0.017), -20.0),
    "Pisiform": ((0.528, 0.706), (0.014, 0.013), 0.0),
}
_WRIST_PIVOT = (0.467, 0.735)
# forearm bones: distal end, proximal end (off the image), width at the distal end, shaft width
_FOREARM = {
    "Radius": ((0.437, 0.757), (0.425, 1.10), 0.085, 0.050),
    "Ulna": ((0.528, 0.762), (0.548, 1.10), 0.042, 0.036),
}


@dataclass(frozen=True)
class HandPose:
    """The random choices behind one synthetic hand (all angles in degrees)."""

    side: str
    scale: float
    rotation: float
    shift: tuple[float, float]
    wrist_bend: float
    spread: tuple[float, ...]
    flexion: tuple[tuple[float, ...], ...]
    length_scale: float
    ring_finger: int | None
    nail_art: bool


def sample_pose(rng: np.random.Generator, side: str, bent_fraction: float, nail_art: bool) -> HandPose:
    bent = rng.random() < bent_fraction
    bend = rng.uniform(12.0, 28.0) * rng.choice([-1.0, 1.0]) if bent else rng.normal(0.0, 3.0)
    return HandPose(
        side=side,
        scale=float(rng.uniform(0.86, 1.02)),
        rotation=float(rng.normal(0.0, 5.0)),
        shift=(float(rng.normal(0.0, 0.02)), float(rng.normal(0.0, 0.015))),
        wrist_bend=float(bend),
        spread=tuple(float(np.clip(rng.normal(0.0, 2.0), -3.5, 3.5)) for _ in _RAYS),
        flexion=tuple(tuple(float(np.clip(rng.normal(0.0, 2.0), -3.0, 3.0)) for _ in ray[3]) for ray in _RAYS),
        length_scale=float(rng.uniform(0.94, 1.06)),
        ring_finger=int(rng.integers(1, 5)) if rng.random() < 0.12 else None,
        nail_art=nail_art,
    )


# ----------------------------------------------------------------------------------------------
# geometry


def _rotate(points: np.ndarray, centre: tuple[float, float], degrees: float) -> np.ndarray:
    # positive = clockwise on screen (image y points down)
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    d = points - np.asarray(centre)
    return np.stack([d[:, 0] * c - d[:, 1] * s, d[:, 0] * s + d[:, 1] * c], axis=1) + np.asarray(centre)


def _bone_outline(p0: np.ndarray, p1: np.ndarray, width: float, tip: bool = False, n: int = 64) -> np.ndarray:
    """A long bone from p0 (base) to p1 (head): a waisted shaft with rounded, wider ends that stay
    within the segment, so neighbouring bones of a ray do not overlap."""
    axis = p1 - p0
    length = float(np.hypot(*axis))
    u = axis / length
    nrm = np.array([-u[1], u[0]])
    t = np.linspace(0.0, 1.0, n)
    waist = 0.72 + 0.28 * np.abs(2 * t - 1) ** 2.5
    if tip:  # distal phalanx: tapers to a tuft
        waist = waist * (1.0 - 0.35 * t**3)
    half = 0.5 * width * waist
    cap_base, cap_head = 0.6 * half[0], 0.7 * half[-1]
    a = p0 + u * cap_base
    b = p1 - u * cap_head
    centre = a + np.outer(t, b - a)
    left = centre + np.outer(half, nrm)
    right = centre - np.outer(half, nrm)
    cap = np.linspace(0.0, math.pi, n // 2)[1:-1]
    head = b + np.outer(np.cos(cap), nrm) * half[-1] + np.outer(np.sin(cap), u) * cap_head
    base = a - np.outer(np.cos(cap), nrm) * half[0] - np.outer(np.sin(cap), u) * cap_base
    return np.concatenate([left, head, right[::-1], base])


def _ellipse_outline(centre, axes, degrees: float, n: int = 96, rng: np.random.Generator | None = None) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    wobble = 1.0 + (0.04 * np.sin(3 * t + rng.uniform(0, 6.28)) if rng is not None else 0.0)
    pts = np.stack([axes[0] * np.cos(t) * wobble, axes[1] * np.sin(t) * wobble], axis=1) + np.asarray(centre)
    return _rotate(pts, centre, degrees)


def hand_outlines(pose: HandPose, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Float outlines of the 29 bones in unit image coordinates, plus soft-tissue guides.

    Returns ``{class: (N, 2) float}`` with extra keys ``"_ray<i>"`` (the ray's joint points) used
    to draw the soft tissue.
    """
    out: dict[str, np.ndarray] = {}
    gap = 0.008 * pose.length_scale
    for r, (names, base, direction, lengths, widths) in enumerate(_RAYS):
        angle = direction + pose.spread[r]
        point = np.asarray(base, dtype=np.float64)
        joints = [point.copy()]
        bones = list(reversed(names))  # base -> tip
        for k, (name, length, width) in enumerate(zip(bones, lengths, widths)):
            angle += pose.flexion[r][k]
            a = math.radians(angle)
            direction_vec = np.array([math.sin(a), -math.cos(a)])
            end = point + direction_vec * length * pose.length_scale
            out[name] = _bone_outline(point, end, width * pose.length_scale, tip=(k == len(bones) - 1))
            point = end + direction_vec * gap
            joints.append(point.copy())
        out[f"_ray{r}"] = np.array(joints)
    for name, (centre, axes, rot) in _CARPALS.items():
        out[name] = _ellipse_outline(centre, axes, rot, rng=rng)
    # the wrist bend turns the hand (carpals and rays) about the wrist, not the forearm
    for name in list(out):
        if name not in _FOREARM:
            out[name] = _rotate(out[name], _WRIST_PIVOT, pose.wrist_bend)
    for name, (distal, proximal, w_end, w_shaft) in _FOREARM.items():
        d, p = np.asarray(distal), np.asarray(proximal)
        axis = d - p
        u = axis / np.hypot(*axis)
        nrm = np.array([-u[1], u[0]])
        t = np.linspace(0.0, 1.0, 80)
        half = 0.5 * (w_shaft + (w_end - w_shaft) * np.clip((t - 0.55) / 0.45, 0, 1) ** 1.5)
        centre = p + np.outer(t, axis)
        cap = np.linspace(0.0, math.pi, 30)[1:-1]
        head = d + np.outer(np.cos(cap), nrm) * half[-1] + np.outer(np.sin(cap), u) * half[-1] * 0.35
        out[name] = np.concatenate([centre + np.outer(half, nrm), head, (centre - np.outer(half, nrm))[::-1]])
    # the hand as a whole: size, rotation, position, then mirror for a left hand
    centre = (0.5, 0.6)
    for name in out:
        pts = (out[name] - np.asarray(centre)) * pose.scale + np.asarray(centre)
        pts = _rotate(pts, centre, pose.rotation) + np.asarray(pose.shift)
        if pose.side == "left":
            pts = pts * np.array([-1.0, 1.0]) + np.array([1.0, 0.0])
        out[name] = pts
    return out


def densify(points: np.ndarray, step: float = 1.0) -> np.ndarray:
    """Resample a closed outline (pixel units) about ``step`` apart and round to integers."""
    closed = np.vstack([points, points[:1]])
    seg = np.hypot(*np.diff(closed, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(int(cum[-1] / step), 8)
    t = np.linspace(0.0, cum[-1], n, endpoint=False)
    dense = np.stack([np.interp(t, cum, closed[:, 0]), np.interp(t, cum, closed[:, 1])], axis=1)
    dense = np.rint(dense).astype(np.int32)
    keep = np.concatenate([[True], (np.diff(dense, axis=0) != 0).any(axis=1)])
    return dense[keep]


# ----------------------------------------------------------------------------------------------
# rendering


def render(outlines: dict[str, np.ndarray], polygons: Polygons, pose: HandPose, size: int,
           rng: np.random.Generator) -> np.ndarray:
    """Draw an X-ray-like ``(size, size)`` uint8 image of the hand."""
    import cv2

    s = float(size)
    img = np.zeros((size, size), dtype=np.float32)
    # background: dark with a smooth gradient (collimator, scatter)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / s
    g = rng.uniform(-1, 1, 3)
    img += 18 + 10 * (g[0] * xx + g[1] * yy) + 6 * g[2] * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)

    # soft tissue: thick strokes along the rays, a palm and a forearm
    tissue = np.zeros_like(img)
    for r in range(len(_RAYS)):
        joints = outlines[f"_ray{r}"] * s
        width = _RAYS[r][4][0] * 2.6 * pose.scale * s
        cv2.polylines(tissue, [np.rint(joints).astype(np.int32).reshape(-1, 1, 2)], False, 1.0,
                      thickness=max(int(width), 1), lineType=cv2.LINE_AA)
        cv2.circle(tissue, tuple(int(v) for v in np.rint(joints[-1])), max(int(width / 2), 1), 1.0, -1, cv2.LINE_AA)
    palm = np.vstack([outlines[f"_ray{r}"][:2] for r in range(len(_RAYS))] +
                     [outlines[n] for n in ("Radius", "Ulna") + tuple(_CARPALS)])
    hull = cv2.convexHull(np.rint(palm * s).astype(np.int32))
    cv2.fillConvexPoly(tissue, hull, 1.0, cv2.LINE_AA)
    forearm = np.vstack([outlines["Radius"], outlines["Ulna"]]) * s
    fhull = cv2.convexHull(np.rint(forearm).astype(np.int32))
    cv2.fillConvexPoly(tissue, fhull, 1.0, cv2.LINE_AA)
    tissue = cv2.dilate(tissue, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (max(int(0.02 * s), 3),) * 2))
    tissue = cv2.GaussianBlur(tissue, (0, 0), 0.006 * s + 0.5)
    img += tissue * rng.uniform(45, 70)

    # bones: dense fill, brighter cortex, trabecular texture; overlaps add up as in a radiograph
    bone = np.zeros_like(img)
    rim = max(int(round(0.0025 * s)), 1)
    for name in CLASSES:
        pts = polygons[name].reshape(-1, 1, 2)
        layer = np.zeros_like(img)
        cv2.fillPoly(layer, [pts], 1.0)
        cv2.polylines(layer, [pts], True, 1.8, thickness=rim)
        bone += layer * rng.uniform(0.85, 1.15)
    texture = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 0.002 * s + 0.3)
    bone *= 1.0 + 0.25 * texture
    img += bone * rng.uniform(70, 95)

    # hardware and decoration that real data has: rings, nail art, side markers
    if pose.ring_finger is not None:
        joints = outlines[f"_ray{pose.ring_finger}"] * s
        a, b = joints[1], joints[2]
        p = a + 0.35 * (b - a)
        u = (b - a) / np.hypot(*(b - a))
        nrm = np.array([-u[1], u[0]])
        w = _RAYS[pose.ring_finger][4][1] * 1.5 * s
        band = np.array([p + nrm * w, p - nrm * w, p - nrm * w + u * 0.012 * s, p + nrm * w + u * 0.012 * s])
        cv2.fillConvexPoly(img, np.rint(band).astype(np.int32), float(rng.uniform(230, 255)), cv2.LINE_AA)
    if pose.nail_art:
        for r in range(1, len(_RAYS)):
            tip = outlines[f"_ray{r}"][-1] * s
            cv2.circle(img, tuple(int(v) for v in np.rint(tip)), max(int(0.007 * s), 1),
                       float(rng.uniform(160, 230)), -1, cv2.LINE_AA)
    if rng.random() < 0.6:
        marker = "R" if pose.side == "right" else "L"
        corner = (int(0.06 * s), int(0.1 * s)) if rng.random() < 0.5 else (int(0.86 * s), int(0.1 * s))
        text = np.zeros((size, size), dtype=np.uint8)  # putText draws on 8-bit images only
        cv2.putText(text, marker, corner, cv2.FONT_HERSHEY_SIMPLEX, 0.0018 * s, 235, max(int(0.004 * s), 1),
                    cv2.LINE_AA)
        img = np.maximum(img, text.astype(np.float32))

    img = cv2.GaussianBlur(img, (0, 0), 0.0008 * s + 0.4)
    img += rng.normal(0.0, rng.uniform(2.0, 5.0), img.shape).astype(np.float32)
    gamma = rng.uniform(0.85, 1.15)
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** gamma
    return np.clip(img, 0, 255).astype(np.uint8)


def synth_hand(pose: HandPose, size: int, rng: np.random.Generator) -> tuple[np.ndarray, Polygons]:
    """One synthetic hand: ``(image (size, size) uint8, {class: (N, 2) int32 polygon})``."""
    outlines = hand_outlines(pose, rng)
    polygons = {name: densify(outlines[name] * size) for name in CLASSES}
    return render(outlines, polygons, pose, size, rng), polygons


# ----------------------------------------------------------------------------------------------
# the data set


@dataclass(frozen=True)
class SynthResult:
    out: Path
    train_ids: list[str]
    test_ids: list[str]
    images: int


def _encode_png(image: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def make_dataset(out: str | Path, ids: int = 20, test_ids: int = 6, size: int = 2048, seed: int = 0,
                 progress=None) -> SynthResult:
    """Write a synthetic data set in the competition layout.

    ``out/train/{DCM,outputs_json}``, ``out/test/DCM`` (no labels), ``out/test_gt/{DCM,outputs_json}``
    (the test split's ground truth, kept apart), and ``out/meta_data.xlsx``. Test IDs are interleaved
    with train IDs; every ID has a right and a left hand; test hands have bent wrists far more often
    (as in the real data). Deterministic for a given seed and arguments.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    total = ids + test_ids
    numbers = np.arange(1, total + 1)
    is_test = np.zeros(total, dtype=bool)
    is_test[rng.choice(total, size=test_ids, replace=False)] = True
    if total and is_test[0] and not is_test.all():
        # ID001 (the one with _R/_L suffixes) is a train ID in the real data
        swap = int(np.flatnonzero(~is_test)[0])
        is_test[0], is_test[swap] = False, True
    stamp = 1661130828152
    train, test = [], []
    jobs = []
    nail_art: dict[int, bool] = {}
    for number, test_flag in zip(numbers, is_test):
        pid = f"ID{number:03d}"
        (test if test_flag else train).append(pid)
        nail = nail_art[int(number)] = bool(rng.random() < 0.08)
        sides = ["right", "left"]
        rng.shuffle(sides)
        for side in sides:
            stamp += int(rng.integers(20_000, 90_000))
            stem = f"image{stamp}" + (("_R" if side == "right" else "_L") if number == 1 else "")
            jobs.append((pid, stem, side, bool(test_flag), nail, int(rng.integers(0, 2**31))))

    if progress is not None:
        progress(total=len(jobs))
    for pid, stem, side, test_flag, nail, job_seed in jobs:
        job_rng = np.random.default_rng(job_seed)
        pose = sample_pose(job_rng, side, bent_fraction=0.57 if test_flag else 0.11, nail_art=nail)
        image, polygons = synth_hand(pose, size, job_rng)
        png = _encode_png(image)
        doc = polygon_document(polygons, f"{stem}.jpg", f"/X-ray_UNIST/20220822/{pid}")
        splits = ("test", "test_gt") if test_flag else ("train",)
        for split in splits:
            atomic_write_bytes(out / split / IMAGES_DIR / pid / f"{stem}.png", png)
        label_split = "test_gt" if test_flag else "train"
        atomic_write_json(out / label_split / LABELS_DIR / pid / f"{stem}.json", doc)
        if progress is not None:
            progress()

    write_meta_xlsx(out / "meta_data.xlsx", numbers, nail_art, rng)
    return SynthResult(out, train, test, len(jobs))


def write_meta_xlsx(path: Path, numbers: np.ndarray, nail_art: dict[int, bool], rng: np.random.Generator) -> None:
    """A ``meta_data.xlsx`` like the real one: Korean headers, an unnamed nail-art column, a stray
    ``_x0008_`` in some sex cells, and a few IDs that have no images."""
    import pandas as pd

    extra = np.arange(numbers.max() + 1, numbers.max() + 1 + max(2, len(numbers) // 10)) if len(numbers) else []
    rows = []
    for number in list(numbers) + list(extra):
        sex = "남" if rng.random() < 0.5 else "여"
        if rng.random() < 0.1:
            sex += "_x0008_"
        height = float(np.round(rng.normal(172 if sex.startswith("남") else 160, 7), 1))
        rows.append({"ID": int(number), "나이": int(rng.integers(19, 70)), "성별": sex,
                     "체중(몸무게)": float(np.round(rng.normal(height - 100, 9), 1)), "키(신장)": height,
                     "Unnamed: 5": "네일있음" if nail_art.get(int(number), rng.random() < 0.08) else None})
    frame = pd.DataFrame(rows)
    frame.columns = ["ID", "나이", "성별", "체중(몸무게)", "키(신장)", ""]
    with atomic_open(path, "wb") as f:
        frame.to_excel(f, index=False, engine="openpyxl")
