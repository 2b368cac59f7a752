"""Unstructured and N:M weight sparsity: selection, criteria, recovery and storage."""
