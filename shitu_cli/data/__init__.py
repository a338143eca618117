"""Datasets: safe image reading, list formats, splitting."""
