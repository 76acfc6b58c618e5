"""Training data: distillation pairs, introspection, held-out split, scales."""
