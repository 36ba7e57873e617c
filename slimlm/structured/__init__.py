"""Structured compression: remove decoder blocks, heads and MLP channels, or factor weights low-rank."""
