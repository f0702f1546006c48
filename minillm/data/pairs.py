"""Sentence pairs for BERT's next-sentence prediction (NSP), cut from any token stream.

BERT pre-trains on two tasks at once (Devlin et al. 2019, §3.1): masked-LM, and "is segment B the
text that follows segment A?". Every training input is a pair

    [CLS] A₁ … Aₙ [SEP] B₁ … Bₘ [SEP]          token types  0 0 … 0 0 1 … 1 1

and B is the true continuation of A half of the time (label 0, "IsNext") and a segment from a
random place in the corpus otherwise (label 1, "NotNext"; Hugging Face's label convention). The
[CLS] vector, pooled, must then tell the two apart; the segment (token-type) embedding tells every
token which side of the pair it is on.

BERT's own data builder cuts documents at sentence ends. Our corpora are token streams, so a
segment here is a span of tokens: A gets a random length, B the rest of the block, and the pair
always fills block_size exactly (no padding in pre-training, as with BERT's packed 512-token inputs).
A random B is drawn far enough from A's true continuation that it never overlaps it.

    >>> x, types, nsp_labels = nsp_pairs(tokens, 8, 64, tokenizer, generator)   # then mask_tokens(x)
"""

from __future__ import annotations

import numpy as np
import torch

NSP_SPECIAL_TOKENS = ("[PAD]", "[MASK]", "[CLS]", "[SEP]")  # what MLM+NSP pre-training needs
IS_NEXT, NOT_NEXT = 0, 1


def nsp_pairs(tokens, batch_size: int, block_size: int, tokenizer,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (B, T) pair ids, token_type_ids (B, T), next_sentence_labels (B,)) for a batch of pairs.

    tokens: a 1-D array of token ids (a prepared split). Random numbers come from `generator` on the
    CPU, a fixed number of draws per batch, so the same seed gives the same pairs on any device.
    """
    missing = [s for s in ("[CLS]", "[SEP]") if s not in tokenizer.special_tokens]
    if missing:
        raise ValueError(f"next-sentence pairs need the special tokens {missing} in the tokenizer; prepare the "
                         "data with special_tokens=NSP_SPECIAL_TOKENS (train with --objective=mlm+nsp)")
    B, T, N = batch_size, block_size, len(tokens)
    budget = T - 3  # room for A and B once [CLS] and two [SEP] are in
    if budget < 2:
        raise ValueError(f"block_size={T} leaves no room for two segments and [CLS], [SEP], [SEP]; use >= 5")
    if N < 3 * budget:
        raise ValueError(f"the split has {N} tokens, too few for pairs of {budget} tokens from two places; "
                         "use more text or a smaller block_size")
    cls_id, sep_id = tokenizer.special_tokens["[CLS]"], tokenizer.special_tokens["[SEP]"]

    # the draws: A's length, A's start, the coin, and where a random B would come from
    len_a = torch.randint(1, budget, (B,), generator=generator)  # 1 .. budget-1, so B gets >= 1 token
    len_b = budget - len_a
    start_a = torch.randint(0, N - budget + 1, (B,), generator=generator)  # A then its true B fit in
    is_next = torch.rand(B, generator=generator) < 0.5
    # a random B: a start b whose span cannot overlap the pair's true text [start_a, start_a + budget),
    # i.e. b <= start_a - budget or b >= start_a + budget. Draw from the N - 3·budget + 2 starts that
    # remain once the 2·budget - 1 forbidden ones are cut out, then step over the forbidden stretch.
    # (Near the ends of the split fewer starts are forbidden, so the draw is a little less than uniform.)
    others = torch.randint(0, N - 3 * budget + 2, (B,), generator=generator)
    lo = start_a - budget + 1  # the first forbidden start
    far = torch.where(others >= lo, others + 2 * budget - 1, others)  # at most N - budget: B still fits
    start_b = torch.where(is_next, start_a + len_a, far)

    x = torch.empty(B, T, dtype=torch.int64)
    types = torch.zeros(B, T, dtype=torch.int64)
    for r in range(B):  # B rows of a few slices each: clearer than fancy indexing, and not the bottleneck
        a, n_a, b, n_b = int(start_a[r]), int(len_a[r]), int(start_b[r]), int(len_b[r])
        seg_a = torch.from_numpy(np.asarray(tokens[a:a + n_a], dtype=np.int64))
        seg_b = torch.from_numpy(np.asarray(tokens[b:b + n_b], dtype=np.int64))
        x[r] = torch.cat([torch.tensor([cls_id]), seg_a, torch.tensor([sep_id]), seg_b, torch.tensor([sep_id])])
        types[r, n_a + 2:] = 1  # B and the final [SEP]
    labels = torch.where(is_next, IS_NEXT, NOT_NEXT)
    return x, types, labels
