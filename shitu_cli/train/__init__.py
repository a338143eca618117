"""Training: one dygraph loop shared by cls and rec, with pluggable loss and evaluation."""
