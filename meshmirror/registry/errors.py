"""OCI distribution error responses.

Every failure the registry reports is a `RegistryError` carrying the spec's
error code, so handlers raise and one place renders the JSON body
``{"errors": [{"code", "message", "detail"}]}`` with the right status. Codes
beyond the OCI list (TAG_INVALID, RANGE_INVALID) are the ones Distribution
itself uses, so clients that know Distribution understand them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

from starlette.responses import Response

# code -> (status, default message)
ERROR_CODES: Final[Mapping[str, tuple[int, str]]] = {
    "NAME_INVALID": (400, "invalid repository name"),
    "TAG_INVALID": (400, "manifest tag did not match URI"),
    "DIGEST_INVALID": (400, "provided digest did not match uploaded content"),
    "NAME_UNKNOWN": (404, "repository name not known to registry"),
    "MANIFEST_UNKNOWN": (404, "manifest unknown"),
    "BLOB_UNKNOWN": (404, "blob unknown to registry"),
    "NOT_FOUND": (404, "no such endpoint"),
    "UNSUPPORTED": (405, "the operation is unsupported"),
    "RANGE_INVALID": (416, "invalid content range"),
    "UNAVAILABLE": (503, "service unavailable"),
}


class RegistryError(Exception):
    """A request that ends in an OCI error response."""

    def __init__(self, code: str, message: str | None = None, detail: object = None,
                 *, status: int | None = None, headers: Mapping[str, str] | None = None) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown registry error code {code!r}")
        default_status, default_message = ERROR_CODES[code]
        self.code = code
        self.message = message or default_message
        self.detail = detail
        self.status = status or default_status
        self.headers = dict(headers or {})
        super().__init__(f"{code}: {self.message}")

    def body(self) -> bytes:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}, separators=(",", ":")).encode()

    def response(self, *, head: bool = False) -> Response:
        """The error as a response; a HEAD gets the headers and no body, as HTTP requires."""
        body = self.body()
        headers = {
            **self.headers,
            "Docker-Distribution-API-Version": "registry/2.0",
            "Content-Length": str(len(body)),
        }
        return Response(b"" if head else body, status_code=self.status, headers=headers,
                        media_type="application/json")
