"""Gateway process entry point: binds the HTTP socket, prints `READY <port>`, serves the app.

`python -m router.gateway_main --router HOST:PORT [--host 127.0.0.1] [--port 30000]`
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys

import uvicorn

from router.gateway import DEFAULT_BODY_TIMEOUT_S, create_app
from router.gateway_http import DEFAULT_HEAD_TIMEOUT_S, server_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kimiserve OpenAI-compatible HTTP gateway")
    parser.add_argument("--router", required=True, help="router gRPC address")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--served-model-name", default="moonshotai/Kimi-K2.5")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--head-timeout", type=float, default=DEFAULT_HEAD_TIMEOUT_S,
                        help="seconds a client has to send a request head (then 408)")  # fmt: skip
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help="seconds a client may pause while sending a body (then 408)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    app = create_app(args.router, args.served_model_name, api_key=args.api_key,
                     body_timeout=args.body_timeout)  # fmt: skip
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    port = sock.getsockname()[1]
    config = server_config(app, log_level=args.log_level, head_timeout=args.head_timeout)
    server = uvicorn.Server(config)
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
