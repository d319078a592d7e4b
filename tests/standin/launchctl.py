"""The stand-in `launchctl` (tests only): passes its arguments to the stand-in launchd
(launchd.py, found through $STANDIN_LAUNCHD_DIR) and prints its answer with its exit code.
Without a running stand-in launchd it answers as launchctl does outside a GUI login."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path


def main() -> int:
    state_dir = os.environ.get("STANDIN_LAUNCHD_DIR", "")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(Path(state_dir) / "launchd.sock"))
            sock.sendall(json.dumps({"argv": sys.argv[1:]}).encode())
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    except OSError:
        sys.stderr.write(f"Could not find domain for user gui: {os.getuid()}\n")
        sys.stderr.write(f"(stand-in launchctl: no stand-in launchd at {state_dir!r})\n")
        return 112
    reply = json.loads(answer)
    sys.stdout.write(reply["out"])
    sys.stderr.write(reply["err"])
    return reply["code"]


if __name__ == "__main__":
    sys.exit(main())
