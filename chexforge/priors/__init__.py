"""Compact statistics from public label sets: finding co-occurrence by demographics, box geometry, mask libraries."""
