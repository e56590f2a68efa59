"""Converters from other learned-optimizer checkpoint formats to lopt_hf artifacts."""
