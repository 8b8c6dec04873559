"""``zinit serve``: one process (uvicorn), or Ray Serve replicas with ``--ray-replicas`` (:mod:`zinit.serve.ray`).
Its options and usage: :mod:`zinit.serve.options`."""

from __future__ import annotations

import logging
from typing import Sequence

from ..hub import resolve_adapter
from ..io import read_adapter_config
from .options import build_server, check_names, parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: parse, check the adapters, then serve until SIGTERM/SIGINT."""
    args = parser().parse_args(argv)
    names = check_names(args)
    if args.ray_replicas is not None:
        from .ray import main as ray_main  # ray: the optional ray extra

        return ray_main(args)
    from .app import create_app  # fastapi and uvicorn: the optional serve extra

    folders = {name: resolve_adapter(source) for name, source in args.adapters}  # a Hub repo id: fetched once
    for folder in folders.values():
        read_adapter_config(folder)  # a missing or broken adapter fails before anything else
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = build_server(args, folders)
    print(f"zinit serve: {type(server.engine.model).__name__} with adapters {names or '(none)'} on "
          f"http://{args.host}:{args.port} (OpenAI-compatible: /v1/completions, /v1/chat/completions, /v1/models)"
          + ("; /v1 routes need the API key" if server.api_key else ""), flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="info")
    return 0
