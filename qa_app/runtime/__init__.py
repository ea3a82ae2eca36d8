"""Serving runtime: dynamic batching of many players' requests onto shared model stages."""
