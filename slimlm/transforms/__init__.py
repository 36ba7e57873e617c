"""Outlier transforms and rotations that make weights and activations easier to quantize, x -> x T, W -> W T⁻ᵀ
(``ops``): SmoothQuant (``smoothquant``), DuQuant (``duquant``), FlatQuant (``flatquant``) and QuaRot's
Hadamard rotation of the residual stream (``rotate``, ``hadamard``); ``outliers`` runs them inside the block loop
and ``blockfit`` trains a block against full precision for FlatQuant and DuQuant+LWC."""
