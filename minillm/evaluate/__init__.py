"""Evaluate: scoring generated text against references, the metrics papers report.

Read in this order:
    bleu.py    corpus BLEU (Papineni et al. 2002) as sacreBLEU computes it: 13a tokenization, clipped
               n-gram precisions, brevity penalty, smoothing — the translation metric
    rouge.py   ROUGE-1/2/L (Lin 2004) as Google's rouge-score computes it — the summarisation metric
    translation.py  both over a test set of translations, with sacreBLEU's signature (`minillm eval --metric=`)
    classification.py  accuracy, precision/recall/F1 and the confusion matrix, as scikit-learn computes them

Both are written out from scratch; tests/test_metrics.py holds them equal to the reference packages.
(Held-out loss and perplexity of a language model live with training, in minillm/train/evaluate.py.)
"""

from minillm.evaluate.bleu import BLEUResult, corpus_bleu, tokenize_13a
from minillm.evaluate.rouge import RougeScore, rouge_n, rouge_l, rouge_scores, rouge_tokenize

__all__ = ["BLEUResult", "RougeScore", "corpus_bleu", "rouge_l", "rouge_n", "rouge_scores", "rouge_tokenize",
           "tokenize_13a"]
