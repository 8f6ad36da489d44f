"""Figures of tables, their errors, the search and end-to-end results (matplotlib, Agg)."""
