"""Inference: the predictor factory, fast preprocessing, and the recognition pipeline."""
