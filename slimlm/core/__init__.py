"""The machinery every stage shares: loading models and data, the block-by-block loop and its statistics."""
