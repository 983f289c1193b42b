"""Ensembles: mask levels and the cut rule, keep-largest, votes, pseudo labels."""
