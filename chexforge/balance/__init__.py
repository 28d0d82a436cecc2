"""Fairness: reading real label files, auditing demographic imbalance, and planning the top-up."""
