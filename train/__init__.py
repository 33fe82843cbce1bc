"""train app (see README)."""
