"""Models: loading a pretrained LM by alias, directory or HF id (load.py), LoRA adapters per client over one
frozen base (adapters.py) and the split at a cut layer into head, server blocks and U-shape tail (split.py)."""
