"""batch.py's job model (one idempotent, resumable job per prompt x arm x seed) and its result tables."""
