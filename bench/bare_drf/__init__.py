"""Bench-only ceiling: bare DRF views on the product's models (never imported by the product)."""
