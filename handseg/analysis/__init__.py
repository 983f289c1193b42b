"""Analysis: metrics, comparisons and HTML reports."""
