"""datagen app (see README)."""
