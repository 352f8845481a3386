"""The OCI distribution pull API served from a Store.

`app.create_app` builds the Starlette application; `server` runs it under
Hypercorn. Nothing here imports the mirror or the mesh: they plug in through
the small `fallback.Fallback` protocol and extra routes, so this package stays
usable on its own (``meshmirror run --store oci:DIR``).
"""
