"""Level 1: the numerical core — tensor decompositions (the only user of tensorly), the whitening
that makes truncation data-aware, and VBMF rank estimates. Works on tensors, knows no modules."""
