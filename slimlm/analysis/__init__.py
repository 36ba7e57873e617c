"""Analyse: per-layer metrics that say where the model can afford compression (spectra, activations, sensitivity)."""
