"""BLEU and ROUGE written out (minillm/evaluate/) against the packages papers quote: sacreBLEU and
Google's rouge-score (test dependencies only: pip install sacrebleu rouge-score)."""

import random

import pytest

from minillm.evaluate import corpus_bleu, rouge_scores, tokenize_13a

WORDS = ("the a cat dog sat on mat man woman is are was in of and to red blue big small house runs "
         "running ran walks walked children child plays playing ball street two three people "
         "wearing shirt young girl boy water").split()
PUNCT = [".", ",", "!", "?", ";", ":", "'s", "-", "&amp;", "&quot;", "(", ")", "3.14", "1,000", "2021-03-03",
         "e-mail", "$5", "50%", "U.S.A.", "<skipped>"]

# real-looking sentences (Multi30k-style captions and news-style text), including the tokenizer's
# hard cases: contractions, numbers with separators, hyphens after digits, entities, trailing spaces
REAL = [
    ("Two young, White males are outside near many bushes.", "Two young white men are outside near bushes."),
    ("A man in an orange hat starring at something.", "A man wearing an orange hat is staring at something."),
    ("A little girl climbing into a wooden playhouse.", "A girl climbs into a wooden playhouse. "),
    ("Several men in hard hats are operating a giant pulley system.",
     "Workers in hard hats operate a giant pulley system."),
    ("The 2016 budget rose 3.5% to $1,200,000 -- officials said.", "Officials said the 2016 budget rose 3.5%."),
    ("It's a well-known fact: cats (usually) sleep 12-16 hours/day!", "Cats usually sleep 12 - 16 hours a day."),
    ("Tom &amp; Jerry said &quot;hello&quot; &lt;again&gt;.", 'Tom & Jerry said "hello" <again>.'),
    ("", "An empty hypothesis scores nothing."),
]


def random_sentence(rng: random.Random, lo: int = 0, hi: int = 18) -> str:
    words = [rng.choice(WORDS) if rng.random() > 0.15 else rng.choice(PUNCT) for _ in range(rng.randint(lo, hi))]
    if words and rng.random() < 0.3:
        words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(["", ".", " .", "!", "  "])


def noisy_copy(rng: random.Random, sentence: str) -> str:
    """A 'translation' sharing many n-grams with the sentence: words dropped, replaced, inserted."""
    out = []
    for w in sentence.split():
        r = rng.random()
        if r < 0.1:
            continue
        out.append(rng.choice(WORDS) if r < 0.25 else w)
        if rng.random() < 0.08:
            out.append(rng.choice(WORDS))
    return " ".join(out)


def random_corpus(seed: int, n: int, n_refs: int):
    rng = random.Random(seed)
    refs = [[random_sentence(rng) for _ in range(n)] for _ in range(n_refs)]
    hyps = [noisy_copy(rng, refs[0][i]) if rng.random() < 0.8 else random_sentence(rng) for i in range(n)]
    return hyps, refs


def test_13a_tokenization_matches_sacrebleu():
    pytest.importorskip("sacrebleu")
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    ref = Tokenizer13a()
    rng = random.Random(0)
    lines = [h for pair in REAL for h in pair] + [random_sentence(rng) for _ in range(300)]
    for line in lines:
        assert tokenize_13a(line) == ref(line), line


@pytest.mark.parametrize("smooth", ["exp", "none", "floor", "add-k"])
@pytest.mark.parametrize("seed,n,n_refs", [(0, 300, 1), (1, 200, 2), (2, 5, 1), (3, 3, 3)])
def test_corpus_bleu_matches_sacrebleu_on_random_corpora(smooth, seed, n, n_refs):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = random_corpus(seed, n, n_refs)
    expected = sacrebleu.corpus_bleu(hyps, refs, smooth_method=smooth)
    got = corpus_bleu(hyps, refs, smooth=smooth)
    assert got.score == pytest.approx(expected.score, abs=1e-6)
    assert got.bp == pytest.approx(expected.bp, abs=1e-12)
    assert (got.sys_len, got.ref_len) == (expected.sys_len, expected.ref_len)


@pytest.mark.parametrize("smooth", ["exp", "none", "floor", "add-k"])
def test_corpus_bleu_matches_sacrebleu_on_real_sentences(smooth):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = [h for h, _ in REAL], [[r for _, r in REAL]]
    for lowercase in (False, True):
        expected = sacrebleu.corpus_bleu(hyps, refs, smooth_method=smooth, lowercase=lowercase).score
        assert corpus_bleu(hyps, refs, smooth=smooth, lowercase=lowercase).score == pytest.approx(expected, abs=1e-6)
    # sentence by sentence: short segments exercise the zero-match smoothing paths
    for h, r in REAL:
        expected = sacrebleu.corpus_bleu([h], [[r]], smooth_method=smooth).score
        assert corpus_bleu([h], [[r]], smooth=smooth).score == pytest.approx(expected, abs=1e-6), (h, r)


def test_bleu_by_hand():
    # hyp 6 words, ref 6 words: p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3 -> "none" gives 0
    hyp, ref = ["the cat sat on the mat"], [["the cat is on the mat"]]
    assert corpus_bleu(hyp, ref, smooth="none").score == 0.0
    # "exp" replaces p4 by 1/(2·3)
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert corpus_bleu(hyp, ref).score == pytest.approx(expected)
    assert corpus_bleu(["a b c d e"], [["a b c d e"]]).score == pytest.approx(100.0)
    # a perfect but short hypothesis is penalised: BP = exp(1 - 10/5)
    assert corpus_bleu(["a b c d e"], [["a b c d e f g h i j"]]).bp == pytest.approx(2.718281828 ** -1)
    with pytest.raises(ValueError, match="smoothing"):
        corpus_bleu(hyp, ref, smooth="bogus")


def _rouge_pairs():
    rng = random.Random(7)
    pairs = list(REAL)
    for _ in range(200):
        t = random_sentence(rng)
        pairs.append((t, noisy_copy(rng, t) if rng.random() < 0.8 else random_sentence(rng)))
    # words the stemmer changes (and words of exactly 3 and 4 letters, around its length cut-off)
    pairs += [("The cats were running and jumping happily", "A cat runs and jumped happy"),
              ("generalization generalize generously", "general generous generalized"),
              ("ran runs sees seeing flies flying", "run running see sees fly flied")]
    return pairs


@pytest.mark.parametrize("stem", [False, True])
def test_rouge_matches_rouge_score(stem):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
    for target, prediction in _rouge_pairs():
        expected = scorer.score(target, prediction)
        got = rouge_scores(target, prediction, stem=stem)
        for name in ("rouge1", "rouge2", "rougeL"):
            e, g = expected[name], got[name]
            assert (g.precision, g.recall, g.fmeasure) == pytest.approx((e.precision, e.recall, e.fmeasure),
                                                                        abs=1e-6), (name, target, prediction)


def test_rouge_by_hand():
    s = rouge_scores("the cat sat on the mat", "the cat on the mat")
    assert (s["rouge1"].precision, s["rouge1"].recall) == (1.0, 5 / 6)
    assert s["rouge2"].recall == pytest.approx(3 / 5)  # "the cat", "on the", "the mat" of 5 bigrams
    assert s["rougeL"].fmeasure == pytest.approx(2 * 1.0 * (5 / 6) / (1 + 5 / 6))  # LCS = all 5 words
