"""Contribution analysis and the sparse-update scheme planner (the paper's Eq. 5)."""
