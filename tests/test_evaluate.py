"""Perplexity against the model's own shifted cross-entropy loss."""
import math

import torch

from slimlm.evaluation.perplexity import perplexity


def test_perplexity_matches_hf_loss(llama):
    ids = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # HF's loss is the mean NLL of the shifted tokens of each window
        losses = [llama(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss.item() for i in range(3)]
    result = perplexity(llama, ids, batch_size=2, progress=False)
    assert math.isclose(result.perplexity, math.exp(sum(losses) / 3), rel_tol=1e-5)
    assert result.windows == 3 and result.seqlen == 32 and result.tokens_per_s > 0
