"""Building models from recipes (ppcls archs, ppdet configs), their manifests, and export."""
