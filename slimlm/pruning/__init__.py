"""Compress by pruning: masks, score methods (magnitude, Wanda, RIA) and SparseGPT; ``methods.METHODS`` names them."""
