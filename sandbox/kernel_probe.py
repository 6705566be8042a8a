"""Readiness probe of a kernel pod (deploy/kubernetes/kernels/): is the kernel serving?

Runs *inside* the kernel's container, as an exec probe, so it needs nothing but what the
kernel image has (the standard library and jupyter_client) and no network policy opening:

    python kernel_probe.py CONNECTION_FILE [--timeout SECONDS]

It reads the kernel's connection file, connects to its shell channel and evaluates `1+1` as a
user expression of a *silent* execution (no execute_input or result broadcast on iopub, no
history, no execution count, `_` untouched), so probing a kernel that a session already uses
changes nothing the session can see. Exit status 0 when the answer `2` came back within the
deadline; 1 otherwise (no connection file yet, no answer, a wrong one), with the reason on
stderr, which the kubelet records in the pod's events. A kernel busy running a long cell
answers only after it: the probe then fails, which is what readiness means (it cannot take
work now).

Standalone on purpose, like kernel_boot.py: the kernel image copies this one file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

EXPRESSION = "1+1"
EXPECTED = "2"


def probe(connection_file: str, timeout: float) -> str | None:
    """None when the kernel answered EXPRESSION with EXPECTED within `timeout` seconds, else
    why not."""
    deadline = time.monotonic() + timeout
    try:
        with open(connection_file) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        return f"no usable connection file {connection_file}: {exc}"

    from jupyter_client import BlockingKernelClient

    # A kernel listening on every address (0.0.0.0, for its pod's IP) is reached on loopback.
    if info.get("transport", "tcp") == "tcp" and info.get("ip") in ("0.0.0.0", "", None):
        info["ip"] = "127.0.0.1"
    client = BlockingKernelClient()
    client.load_connection_info(info)
    client.start_channels(shell=True, iopub=False, stdin=False, hb=False, control=False)
    try:
        msg_id = client.execute(
            "",
            silent=True,
            store_history=False,
            user_expressions={"probe": EXPRESSION},
            allow_stdin=False,
        )
        while (left := deadline - time.monotonic()) > 0:
            try:
                reply = client.get_shell_msg(timeout=left)
            except Exception:  # queue.Empty: nothing within the deadline
                break
            if reply.get("parent_header", {}).get("msg_id") != msg_id:
                continue  # an answer to someone else's request
            content = reply["content"]
            if content.get("status") != "ok":
                return f"execute_reply status {content.get('status')!r}"
            result = content.get("user_expressions", {}).get("probe", {})
            got = result.get("data", {}).get("text/plain")
            if got != EXPECTED:
                return f"{EXPRESSION} gave {got!r} ({result.get('status')!r}), not {EXPECTED!r}"
            return None
        return f"no answer to {EXPRESSION} within {timeout:g} s"
    finally:
        client.stop_channels()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("connection_file")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    args = parser.parse_args(argv)
    why = probe(args.connection_file, args.timeout)
    if why is not None:
        print(f"kernel-probe: not ready: {why}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
