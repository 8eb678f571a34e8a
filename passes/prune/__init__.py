"""Pruning passes: structured channels, magnitude and N:M sparsity."""
