"""The CRM's HTTP API, served by the daemon when ``[api]`` is configured.

app.py builds the aiohttp application and serves it; auth.py turns a bearer token into a
caller; messages.py, records.py and ops.py are the routes; bodies.py decodes a message for
display; openapi.py describes it all; tokens.py makes and hashes tokens (stdlib only, so the
CLI's `api token` commands need no web stack).
"""
