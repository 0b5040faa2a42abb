"""The web dashboard (`make web`): Starlette + Jinja2 pages over the marts, through the Redis
query cache, with server-sent events that refresh open pages after each landed build."""
