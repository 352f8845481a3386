"""The OCI distribution pull API served from a Store.

`app.create_app` builds the Starlette application; `server` runs it under
Hypercorn. Nothing here imports the mesh, routing or the mirror: the mirror
plugs in through the small `fallback.Fallback` protocol and extra routes, so
this package stays usable on its own (``meshmirror run --store oci:DIR``).
"""
