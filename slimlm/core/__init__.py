"""The machinery every stage shares: loading models and data, a model's calibration windows, the block-by-block
loop and its statistics, per-layer budget maps, a stage's result, and the run-folder files the lower layers read."""
