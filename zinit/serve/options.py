"""The options of ``zinit serve`` (:func:`parser`) and the server they describe (:func:`build_server`): shared by the
one-process server (:mod:`zinit.serve.cli`) and each Ray Serve replica (:mod:`zinit.serve.ray`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Mapping

from .. import io, lm
from ..cliargs import positive_float, positive_int
from ..io import read_adapter_config
from ..quant import QUANTIZE_FLAG
from ..train import dist as D
from .engine import Engine

#: ``zinit serve --help``'s description.
DESCRIPTION = """``zinit serve [NAME=]ADAPTER_FOLDER ... [--model M]``: serve a base model and its adapters over HTTP.

    zinit serve out/alpaca/adapter                    # the embedded SmolLM2 + the main job's adapter, as "alpaca"
    zinit serve math=out/math/adapter poems=out/poems/adapter --model /path/to/llama --port 8000
    curl localhost:8000/v1/completions -d '{"model": "alpaca", "prompt": "Hello", "max_tokens": 16}'

Facing a network: --api-key KEY (or the ZINIT_API_KEY environment variable) makes every /v1 route need
"Authorization: Bearer KEY"; --max-body-bytes bounds a request's size.

Past one machine: --ray-replicas N serves through Ray Serve (N replicas, each holding the base and every adapter,
Ray's routing and autoscaling; pip install 'zinit[ray]'):
    zinit serve out/alpaca/adapter --ray-replicas 2 --ray-address auto    # after `ray start --head`
"""

#: The environment variable the API key is read from when ``--api-key`` is not given (as vLLM's VLLM_API_KEY).
API_KEY_ENV = "ZINIT_API_KEY"


def adapter_spec(text: str) -> tuple[str, str]:
    """``NAME=FOLDER`` or ``FOLDER`` (named after the folder, or after its parent when the folder is called
    ``adapter``, as ``zinit train`` writes ``OUT/adapter``)."""
    if "=" in text:
        name, folder = text.split("=", 1)
    else:
        folder = text
        path = Path(text.rstrip("/"))
        name = path.parent.name if path.name == "adapter" and path.parent.name else path.name
    if not name or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: give an adapter folder, or NAME=FOLDER")
    return name, folder


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zinit serve", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="*", type=adapter_spec, metavar="[NAME=]FOLDER",
                   help="adapter folders written by zinit train / zinit.save_adapter (or Hub repo ids "
                        "org/name[@revision]), served under NAME")
    p.add_argument("--model", default=None, help="base model: hub id or local folder (default: the embedded "
                                                 "SmolLM2-135M-Instruct)")
    p.add_argument(QUANTIZE_FLAG[0], **QUANTIZE_FLAG[1])
    p.add_argument("--base-name", default="base", help="the model id that means no adapter (default base)")
    p.add_argument("--adapters-dir", default=None,
                   help="allow POST /v1/adapters to load adapters from this folder (and from nowhere else)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=positive_int, default=8000)
    p.add_argument("--max-batch", type=positive_int, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-queue", type=positive_int, default=64, help="requests waiting at most; more get 429")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="the largest max_tokens a request may ask")
    p.add_argument("--prefill-tokens", type=positive_int, default=2048,
                   help="prompt tokens prefilled per step at most (bounds the pause a burst gives running rows)")
    p.add_argument("--max-body-bytes", type=positive_int, default=None,
                   help="the largest request body in bytes; larger ones get 413 (default 4 MiB)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every /v1 route (401 otherwise); default: the "
                        f"{API_KEY_ENV} environment variable, else no key. Prefer the variable: a flag shows in ps")
    p.add_argument("--device", default=None)
    ray = p.add_argument_group("Ray Serve (the ray extra: pip install 'zinit[ray]'; zinit.serve.ray)")
    ray.add_argument("--ray-replicas", type=positive_int, default=None, metavar="N",
                     help="serve through Ray Serve with N replicas, each holding the base model and every adapter, "
                          "behind Ray's HTTP proxy on --host/--port (default: no Ray, one process)")
    ray.add_argument("--ray-max-replicas", type=positive_int, default=None, metavar="M",
                     help="let Ray's autoscaler run between N and M replicas (target: --max-batch requests in "
                          "flight per replica)")
    ray.add_argument("--ray-address", default=None,
                     help="the Ray cluster to join (e.g. auto, or HEAD_IP:6379 after `ray start --head`); default: "
                          "RAY_ADDRESS, else a local cluster started for this process")
    ray.add_argument("--ray-cpus-per-replica", type=positive_float, default=1.0, metavar="C",
                     help="CPUs Ray reserves for each replica (its torch threads; default 1)")
    ray.add_argument("--ray-gpus-per-replica", type=float, default=0.0, metavar="G",
                     help="GPUs Ray reserves for each replica (default 0)")
    return p


def api_key(args: argparse.Namespace) -> str | None:
    """The API key to require: ``--api-key``, else the :data:`API_KEY_ENV` environment variable, else None (an
    empty value means none)."""
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    return key or None


def build_server(args: argparse.Namespace, folders: Mapping[str, str | Path]) -> Any:
    """The :class:`~zinit.serve.app.Server` that ``args`` (:func:`parser`'s options) describe, holding the adapters
    of ``folders`` (``{name: adapter folder}``): the base model loaded, each adapter added to it, the engine built (not
    started: the app's lifespan starts it). Used by :func:`zinit.serve.cli.main` and by each Ray Serve replica
    (:mod:`zinit.serve.ray`)."""
    from .app import DEFAULT_MAX_BODY_BYTES, Server  # fastapi: the optional serve extra

    # a missing or broken adapter fails before the model loads
    descriptions = {name: read_adapter_config(folder) for name, folder in folders.items()}
    env = D.setup(args.device)
    model, tokenizer = lm.load_model(args.model, env.device, args.quantize)
    formats = {name: lm.adapter_prompt_format(d, tokenizer) for name, d in descriptions.items()}  # as zinit generate
    for name, folder in folders.items():
        io.add_adapter(model, name, folder)
    eos = {tokenizer.eos_token_id} | set(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    engine = Engine(model, eos_token_ids={t for t in eos if t is not None}, max_batch=args.max_batch,
                    max_queue=args.max_queue, prefill_tokens=args.prefill_tokens)
    context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return Server(engine, tokenizer, base_name=args.base_name, adapters_dir=args.adapters_dir,
                  max_tokens=args.max_tokens, context=context, api_key=api_key(args),
                  max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES, prompt_formats=formats)


def check_names(args: argparse.Namespace) -> list[str]:
    """The adapters' names, distinct and not the base model's (exits with the error otherwise)."""
    names = [name for name, _ in args.adapters]
    if len(set(names)) != len(names) or args.base_name in names:
        raise SystemExit(f"zinit serve: error: adapter names must be distinct and not {args.base_name!r}: {names}")
    return names


def _as_list(value: object) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, set)) else [value]
