"""``zinit serve`` past one machine: the same server as N Ray Serve replicas behind Ray's HTTP proxy.

Each replica holds the base model and every adapter (adapters are kilobytes: their files are read once here and
shipped to the replicas with the deployment, so only the base model must be reachable from every node: the
embedded default, a Hub id, or a folder at the same path on each node). The routes are the one-process server's
(:func:`zinit.serve.app.create_app`, the same OpenAI API, API key and limits); Ray routes each request to a replica
and, with ``--ray-max-replicas``, scales their number. Needs the ``ray`` extra (``pip install 'zinit[ray]'``).

    zinit serve math=out/math/adapter --ray-replicas 2                       # a local Ray cluster, 2 replicas
    ray start --head                                                         # or a cluster: on the head node
    ray start --address HEAD_IP:6379                                         # on every other node
    zinit serve math=out/math/adapter --ray-replicas 4 --ray-address auto    # on the head node

Or from a Serve config file / ``serve run`` (:func:`app_builder`):

    serve run zinit.serve.ray:app_builder adapters="math=/abs/out/math/adapter" ray_replicas=2

Adapters are fixed at deploy time: ``--adapters-dir`` (loading and unloading over HTTP) would change one replica
only, so it is refused here; deploy again with the new list (Ray replaces the replicas one by one).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import ray
from ray import serve

from ..hub import resolve_adapter
from ..io import read_adapter_config
from .app import create_app
from .options import api_key, build_server, check_names, parser

#: The Serve application's (and its deployment's) name.
APP_NAME = "zinit"
#: An adapter folder larger than this is refused before it is shipped to every replica (a zinit adapter is
#: kilobytes to a few MiB; a folder this large holds something else).
MAX_ADAPTER_BYTES = 256 * 2**20


def adapter_files(folders: Mapping[str, str | Path]) -> dict[str, dict[str, bytes]]:
    """``{name: {file name: bytes}}``: each adapter folder's files (its top level), checked to be an adapter
    (:func:`zinit.read_adapter_config`) and read once, to travel with the deployment to every replica."""
    out: dict[str, dict[str, bytes]] = {}
    for name, folder in folders.items():
        folder = Path(folder)
        read_adapter_config(folder)  # a missing or broken adapter fails here, before Ray starts anything
        files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}
        size = sum(p.stat().st_size for p in files.values())
        if size > MAX_ADAPTER_BYTES:
            raise ValueError(f"adapter {name!r}: {folder} holds {size / 2**20:.0f} MiB of files, more than the "
                             f"{MAX_ADAPTER_BYTES // 2**20} MiB an adapter folder may ship to the replicas; keep only "
                             "zinit.json and adapter.safetensors in it")
        out[name] = {file: path.read_bytes() for file, path in files.items()}
    return out


def replica_app(options: argparse.Namespace, adapters: Mapping[str, Mapping[str, bytes]]) -> Callable[[], Any]:
    """The builder Ray calls in each replica: write the shipped adapter files to a temporary folder, build the
    server from ``options`` (:func:`zinit.serve.options.build_server`) and return its app. The engine starts and
    stops with the app's lifespan, which Ray runs."""
    def build() -> Any:
        with tempfile.TemporaryDirectory(prefix="zinit-ray-") as tmp:
            folders = {}
            for i, (name, files) in enumerate(adapters.items()):
                folder = Path(tmp) / str(i)  # names are the client's model ids: never path parts
                folder.mkdir()
                for file, data in files.items():
                    (folder / file).write_bytes(data)
                folders[name] = folder
            server = build_server(options, folders)  # the adapters are in memory once added
        return create_app(server)

    return build


def application(options: argparse.Namespace, folders: Mapping[str, str | Path] | None = None) -> Any:
    """The Ray Serve application of :func:`zinit.serve.options.parser`'s ``options`` (``ray_replicas`` replicas,
    or Ray's autoscaling between ``ray_replicas`` and ``ray_max_replicas``), serving the adapters of ``folders``
    (default: ``options.adapters``, resolved here). Deploy it with ``serve.run(app, name=APP_NAME)``.

    >>> from zinit.serve.options import parser
    >>> app = application(parser().parse_args(["--ray-replicas", "2"]))  # the embedded base model, no adapter
    >>> type(app).__name__
    'Application'
    """
    if options.adapters_dir:
        raise ValueError("--adapters-dir (loading adapters over HTTP) would change one Ray replica only: list the "
                         "adapters on the command line and deploy again to change them")
    replicas = options.ray_replicas or 1
    if options.ray_max_replicas is not None and options.ray_max_replicas < replicas:
        raise ValueError(f"--ray-max-replicas {options.ray_max_replicas} is below --ray-replicas {replicas}: give "
                         "at least as many")
    if not options.ray_cpus_per_replica > 0 or not options.ray_gpus_per_replica >= 0:
        raise ValueError(f"--ray-cpus-per-replica must be > 0 and --ray-gpus-per-replica >= 0, got "
                         f"{options.ray_cpus_per_replica} and {options.ray_gpus_per_replica}")
    if folders is None:
        folders = {name: resolve_adapter(source) for name, source in options.adapters}
    adapters = adapter_files(folders)
    # the key is read here, once: a replica on another node has another environment ("" = no key, never its own)
    options = argparse.Namespace(**{**vars(options), "api_key": api_key(options) or "", "adapters": []})
    if options.ray_max_replicas is not None and options.ray_max_replicas > replicas:
        scaling: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": replicas, "max_replicas": options.ray_max_replicas,
            "target_ongoing_requests": options.max_batch}}
    else:
        scaling = {"num_replicas": replicas}
    ingress = serve.ingress(replica_app(options, adapters))()
    deployment = serve.deployment(
        ingress, name=APP_NAME,
        ray_actor_options={"num_cpus": options.ray_cpus_per_replica, "num_gpus": options.ray_gpus_per_replica},
        # the engine batches and queues itself (429 beyond --max-queue): Ray must not hold requests back at 5
        max_ongoing_requests=options.max_batch + options.max_queue, **scaling)
    return deployment.bind()


def app_builder(args: dict[str, str]) -> Any:
    """The application of a Serve config file's ``import_path: zinit.serve.ray:app_builder`` (or ``serve run``):
    ``args`` are ``zinit serve``'s options by their long names (``model``, ``ray_replicas``, ``max_batch`` ...),
    ``adapters`` a space-separated list of ``[NAME=]FOLDER`` (absolute paths: the config runs elsewhere).

    >>> type(app_builder({"ray_replicas": "2", "max_batch": "4"})).__name__
    'Application'
    """
    argv = shlex.split(str(args.get("adapters", "")))
    for key, value in args.items():
        if key != "adapters":
            argv += [f"--{key.replace('_', '-')}", str(value)]
    options = parser().parse_args(argv)
    check_names(options)
    return application(options)


def main(options: argparse.Namespace) -> int:
    """``zinit serve --ray-replicas N``: join (or start) a Ray cluster, deploy, wait until every replica is up, then
    serve until SIGTERM/SIGINT, and remove the application on the way out."""
    app = application(options)
    init: dict[str, Any] = {"address": options.ray_address} if options.ray_address else {}
    if not options.ray_address and not os.environ.get("RAY_ADDRESS"):
        init["include_dashboard"] = False  # a cluster of our own: no dashboard to start
        # Serve gives its HTTP proxy 5 s to come up, then kills it: a busy machine (a model loading beside it) needs
        # longer. Our own cluster's processes inherit this environment.
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    ray.init(**init)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        serve.run(app, name=APP_NAME, route_prefix="/")  # returns once every replica is up
        names = [name for name, _ in options.adapters]
        print(f"zinit serve: {options.ray_replicas} Ray Serve replica(s) with adapters {names or '(none)'} on "
              f"http://{options.host}:{options.port} (OpenAI-compatible: /v1/completions, /v1/chat/completions, "
              "/v1/models)" + ("; /v1 routes need the API key" if api_key(options) else ""), flush=True)
        stop.wait()
    finally:
        serve.delete(APP_NAME)  # replicas finish (the lifespan stops each engine); others' apps stay
        ray.shutdown()
    return 0
