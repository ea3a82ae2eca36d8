"""Models: the text bi-encoder and the cross-encoder ranker (speech comes later)."""
