"""Prefect flow `sync_pipeline`, Redis cache and lock, alerts and the dashboard."""
