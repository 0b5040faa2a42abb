"""Mongo → ClickHouse loader: streams changed documents into the `raw` tables by watermark."""
