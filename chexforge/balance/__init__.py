"""Fairness: auditing a real dataset's demographic imbalance and planning the synthetic top-up.

`audit_labels` and `balance_labels` (api.py) are what `chexforge audit` and `chexforge balance` run.
"""

from .api import AuditResult, BalanceResult, LabelSource, audit_labels, balance_labels

__all__ = ["AuditResult", "BalanceResult", "LabelSource", "audit_labels", "balance_labels"]
