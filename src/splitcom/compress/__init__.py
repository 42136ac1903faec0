"""Compression: codecs, temporal reuse, shared prompt prefixes, adapter deltas; the stream plan (plan.py)
and the stream ends that apply it (pipeline.py); the threshold controllers (control/)."""
