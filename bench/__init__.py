"""`make bench`: the loader, the sync paths, the dashboard and memory, against baselines.

Entry point `bench.run`; settings `bench.config`; report layout and JSON keys `bench.report`;
baselines `bench.baselines`.
"""
