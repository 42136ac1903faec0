"""What an honest-but-curious server can read of a client's text (``splitcom audit``), in pipeline order:
capture (act_up as the server decodes it), inverters (the learned attack), attacks (the optimisation attack),
scores (token accuracy, BLEU, ROUGE-L of prompt and completion), run (the audit of a run directory)."""
