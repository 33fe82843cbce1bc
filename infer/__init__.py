"""infer app (see README)."""
