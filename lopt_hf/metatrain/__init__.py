"""Meta-training: task families, vectorised inner training, meta-gradient estimators, outer loop."""
