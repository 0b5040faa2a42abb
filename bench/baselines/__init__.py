"""Baselines the loader is measured against. They live here, never in the product."""
