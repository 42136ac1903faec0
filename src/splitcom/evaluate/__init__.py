"""Quality of a trained adapter: validation perplexity (perplexity.py), generation on held-out inputs
(generate.py, ``splitcom eval``) and the E2E metrics BLEU, NIST, METEOR, ROUGE_L, CIDEr (score.py, metrics.py, nist.py)."""
