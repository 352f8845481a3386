"""The two halves of the chart's post-delete cleanup, run by the image's python3.

``serve HOST PORT``: answer ``GET /readyz`` with 200 until stopped. The cleanup
DaemonSet's main container runs it after its init container's ``meshmirror
cleanup`` restored the node, so a pod that answers is a node that is clean.

``wait NAME PORT``: resolve NAME (the cleanup pods' headless Service, which
publishes not-ready pods too) and exit 0 once every address answered 200 on
three rounds in a row. Helm waits for this pod to succeed, so ``helm uninstall``
returns only when every node it found was restored; the repeated rounds give pods
still being scheduled the time to appear. The pod's activeDeadlineSeconds bounds
the wait.

It is shipped with the chart, not with meshmirror, because it only sequences
Kubernetes objects; ``meshmirror cleanup`` itself does the restoring.
"""

import http.server
import socket
import socketserver
import sys
import time
import urllib.request

ROUNDS = 3
PERIOD = 2.0


class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/readyz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(http.server.HTTPServer):
    def server_bind(self) -> None:
        # HTTPServer's own asks reverse DNS for the bound address, which nothing uses.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])


def serve(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("FamilyServer", (Server,), {"address_family": family})
    server_class((host, port), Ready).serve_forever()


def all_ready(name: str, port: int) -> bool:
    addresses = {info[4][0] for info in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)}
    for address in sorted(addresses):
        host = f"[{address}]" if ":" in address else address
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=2) as response:
            if response.status != 200:
                return False
    print(f"{len(addresses)} node(s) cleaned up", flush=True)
    return bool(addresses)


def wait(name: str, port: int) -> None:
    streak = 0
    while streak < ROUNDS:
        try:
            streak = streak + 1 if all_ready(name, port) else 0
        except OSError as err:
            print(f"not yet: {err}", flush=True)
            streak = 0
        if streak < ROUNDS:
            time.sleep(PERIOD)


if __name__ == "__main__":
    command, host_or_name, port_text = sys.argv[1:4]
    {"serve": serve, "wait": wait}[command](host_or_name, int(port_text))
