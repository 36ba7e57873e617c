"""Report: one HTML/markdown page of many runs, and the PNG plots."""
