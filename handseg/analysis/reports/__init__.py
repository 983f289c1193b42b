"""HTML reports that a browser opens offline, from the file system: ``index.html`` (static sections,
matplotlib figures, the page's data as embedded JSON and one small script for the per-image table
and viewer) and ``overlays/`` (every image's masks at full resolution, linked from the page).

``compare_report`` is ``handseg compare --out``; ``eda_report`` is ``handseg eda``.
"""

from handseg.analysis.reports.compare import compare_report
from handseg.analysis.reports.eda import EdaInputs, eda_report, read_eda_inputs
from handseg.analysis.reports.overlays import CLASS_COLOURS, DIFF_COLOURS, OverlayWriter, diff_overlay
from handseg.analysis.reports.page import Report, text_colour

__all__ = ["CLASS_COLOURS", "DIFF_COLOURS", "EdaInputs", "OverlayWriter", "Report", "compare_report", "diff_overlay",
           "eda_report", "read_eda_inputs", "text_colour"]
