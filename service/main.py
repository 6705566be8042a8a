"""`kernelbox serve`: run the app under uvicorn."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from .app import create_app
from .http import http_protocol
from .settings import Settings

log = logging.getLogger("kernelbox")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class QuietProbes(logging.Filter):
    """Drop access-log lines of successful health probes (one every few seconds, forever)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        # uvicorn.access args: (client, method, path, http version, status)
        return not (len(args) == 5 and args[2] in ("/healthz", "/readyz") and args[4] == 200)


def serve(settings: Settings, key_on_command_line: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("uvicorn.access").addFilter(QuietProbes())
    if key_on_command_line:
        log.warning(
            "--api-key puts the key in the process list, where every user of this machine "
            "can read it; set KERNELBOX_API_KEY or KERNELBOX_API_KEY_FILE instead"
        )
    if not settings.api_key:
        if is_loopback(settings.host):
            log.warning("no API key configured: listening on %s (loopback) only", settings.host)
        else:
            log.warning(
                "no API key configured and listening on %s: anyone who can reach this port "
                "can run code. Set KERNELBOX_API_KEY.",
                settings.host,
            )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=10,
        # Agents and RL workers keep connections open between calls; a 5 s keep-alive (the
        # default) races their next request and shows up as a read error on their side.
        timeout_keep_alive=75,
        http=http_protocol(settings.header_timeout),
        log_level="info",
    )
