"""Evaluate: perplexity with the literature's protocol, zero-shot accuracy through lm-evaluation-harness."""
