"""``meta_data.xlsx``: age, sex, weight, height and nail art per patient ID."""

from __future__ import annotations

import re
from pathlib import Path

from handseg.common.errors import HandsegError

# The real file's Korean headers, in order; the sixth column has no name.
META_COLUMNS = {"ID": "id", "나이": "age", "성별": "sex", "체중(몸무게)": "weight_kg", "키(신장)": "height_cm"}
NAIL_ART_VALUE = "네일있음"
SEX_VALUES = {"남": "M", "여": "F", "M": "M", "F": "F", "male": "M", "female": "F"}


def patient_id(value) -> str:
    """Normalise an ID cell (``1``, ``"1"``, ``"ID001"``) to the folder name ``ID001``."""
    text = str(value).strip()
    digits = re.sub(r"\D", "", text)
    if not digits:
        raise ValueError(f"not a patient ID: {value!r}")
    return f"ID{int(digits):03d}"


def read_meta(path: str | Path):
    """Read ``meta_data.xlsx`` into a DataFrame indexed by ``id`` (``ID001``...).

    Columns: ``age``, ``sex`` (``M``/``F``, the stray ``_x0008_`` artefact removed), ``weight_kg``,
    ``height_cm``, ``nail_art`` (bool, from the unnamed sixth column).

    Raises:
        HandsegError: the file is missing, unreadable, or lacks the ``ID`` column.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise HandsegError("meta data file not found", path)
    try:
        raw = pd.read_excel(path, dtype=object, engine="openpyxl")
    except Exception as e:  # openpyxl raises a zoo of types for a corrupt workbook
        raise HandsegError(f"cannot read spreadsheet ({type(e).__name__}: {e})", path) from None
    if "ID" not in raw.columns:
        raise HandsegError(f"no 'ID' column (columns: {', '.join(map(str, raw.columns))})", path)
    table = raw.rename(columns=META_COLUMNS)
    extra = [c for c in raw.columns if c not in META_COLUMNS]
    table["nail_art"] = table[extra[0]].astype(str).str.strip().eq(NAIL_ART_VALUE) if extra else False
    table = table.drop(columns=extra)
    table = table[table["id"].notna()].copy()
    table["id"] = table["id"].map(patient_id)
    if "sex" in table:
        cleaned = table["sex"].astype(str).str.replace("_x0008_", "", regex=False)
        cleaned = cleaned.str.replace("\x08", "", regex=False).str.strip()
        table["sex"] = cleaned.map(lambda s: SEX_VALUES.get(s, SEX_VALUES.get(s.lower(), None)))
    for column in ("age", "weight_kg", "height_cm"):
        if column in table:
            table[column] = pd.to_numeric(table[column], errors="coerce")
    return table.set_index("id")
