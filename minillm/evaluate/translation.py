"""Scoring translations: corpus BLEU (sacreBLEU's default, bleu.py) and ROUGE F1 (rouge.py).

BLEU is reported with a sacreBLEU-style signature, which says how the number was computed (number
of references, casing, tokenizer, smoothing): BLEU scores are only comparable when these agree
(Post 2018, "A Call for Clarity in Reporting BLEU Scores"). bleu.py computes what sacreBLEU 2.x
computes for this signature, and the tests hold the two equal.
"""

from __future__ import annotations

from minillm.evaluate.bleu import corpus_bleu
from minillm.evaluate.rouge import rouge_scores

METRICS = ("bleu", "rouge")
BLEU_SIGNATURE = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.x (minillm.evaluate.bleu)"


def parse_metrics(text: str) -> list[str]:
    """"bleu,rouge" -> ["bleu", "rouge"]; an unknown name is an error listing the known ones."""
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric {', '.join(unknown) or repr(text)}; choose from {', '.join(METRICS)}")
    return names


def score_translations(hypotheses: list[str], references: list[str], metrics: list[str]) -> dict[str, float]:
    """{"bleu": 0..100, "rouge1"/"rouge2"/"rougeL": mean F1 in 0..100} for one reference per sentence."""
    out: dict[str, float] = {}
    if "bleu" in metrics:
        r = corpus_bleu(hypotheses, [references])
        out.update(bleu=r.score, bleu_bp=r.bp, **{f"bleu_p{n + 1}": p for n, p in enumerate(r.precisions)})
    if "rouge" in metrics:
        sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for ref, hyp in zip(references, hypotheses):
            for name, s in rouge_scores(ref, hyp).items():  # rouge-score's argument order: (target, prediction)
                sums[name] += s.fmeasure
        out.update({name: 100 * v / max(len(references), 1) for name, v in sums.items()})
    return out
