"""`vlmfast serve`: a checkpoint behind the OpenAI chat-completions API.

    vlmfast serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch 32] [--kv-memory 2]
                  [--api-key KEY] [--allowed-local-media-path DIR] [--allowed-media-domains a.com,.b.org]

--port 0 takes a free port; the address is printed on stderr once the server is ready. SIGTERM
(or Ctrl-C): the listening socket closes, requests still arriving on open connections get 503,
the requests in flight are answered to the end, then the process exits 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16", "auto")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="checkpoint folder of a family vlmfast.pipeline serves (SmolVLM / SmolVLM2 / Idefics3, "
                        "Qwen2-VL / Qwen2.5-VL, LLaVA-1.5, BLIP-2 OPT), read from config.json's model_type")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed on stderr)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoding together (default 32)")
    p.add_argument("--kv-memory", type=float, default=2.0,
                   help="GiB of KV cache (default 2): with --max-batch it sets the longest prompt + answer")
    p.add_argument("--api-key", default=os.environ.get("VLMFAST_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $VLMFAST_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model's id in the API (default: the folder's name)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--allowed-local-media-path", type=Path, default=None,
                   help="file:// image URLs may read files under this folder only (default: none)")
    p.add_argument("--allowed-media-domains", default="",
                   help="comma-separated hosts http(s) image URLs may name ('.example.com': subdomains too); "
                        "default: no fetching")
    p.add_argument("--media-timeout", type=float, default=10.0, help="seconds per image fetch (default 10)")
    p.add_argument("--max-image-mib", type=float, default=20.0, help="an image's encoded size at most (default 20)")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="width x height at most, checked before decoding (default 40M)")
    p.add_argument("--max-images", type=int, default=8, help="images per request at most (default 8)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests at most; beyond: 429 (default 256)")
    p.add_argument("--chunk-tokens", type=int, default=256,
                   help="prefill work per scheduler iteration, in tokens (default 256)")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="answer length when a request names none (default 512)")
    p.add_argument("--encoder-cache-mib", type=float, default=512.0,
                   help="image features kept for repeated images (default 512)")
    p.add_argument("--prefix-cache-mib", type=float, default=512.0,
                   help="keys / values of prefilled prompts kept, so a prompt starting the same way (the same image "
                        "asked again, a next turn) prefills only the rest (default 512; 0: off)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])


def _check(args) -> None:
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-images", args.max_images, 0),
                             ("--max-queue", args.max_queue, 1), ("--chunk-tokens", args.chunk_tokens, 1),
                             ("--default-max-tokens", args.default_max_tokens, 1), ("--port", args.port, 0)):
        if value < low:
            raise ValueError(f"{flag}: expected an int >= {low}, got {value}")
    for flag, value in (("--kv-memory", args.kv_memory), ("--media-timeout", args.media_timeout),
                        ("--max-image-mib", args.max_image_mib)):
        if not value > 0:
            raise ValueError(f"{flag}: expected a positive number, got {value}")
    for flag, value in (("--encoder-cache-mib", args.encoder_cache_mib), ("--prefix-cache-mib", args.prefix_cache_mib)):
        if not value >= 0:
            raise ValueError(f"{flag}: expected >= 0, got {value}")
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model: {args.model} is not a checkpoint folder")


def load_family(path, *, device, dtype):
    """(model, processor) of the checkpoint's family, as vlmfast.pipeline loads them (config.json's
    model_type picks the classes); ValueError naming --model for a family it does not serve."""
    import importlib

    from vlmfast.models import checkpoint
    from vlmfast.pipelines import FAMILIES

    model_type = checkpoint.read_config(path).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"--model: config.json's model_type {model_type!r} is not a chat model vlmfast serves; "
                         f"supported: {sorted(FAMILIES)}")
    classes = []
    for target in FAMILIES[model_type]:
        module, _, name = target.partition(":")
        classes.append(getattr(importlib.import_module(module), name))
    network_class, processor_class = classes
    return network_class.from_pretrained(path, device=device, dtype=dtype), processor_class.from_pretrained(path)


def build(args):
    """(engine, processor, config) from the parsed arguments; the model loaded."""
    import torch

    from vlmfast.serving.app import ServerConfig
    from vlmfast.serving.engine import Engine
    from vlmfast.serving.media import MediaPolicy

    _check(args)
    policy = MediaPolicy(local_root=args.allowed_local_media_path,
                         allowed_domains=tuple(args.allowed_media_domains.split(",")),
                         max_bytes=int(args.max_image_mib * (1 << 20)), max_pixels=args.max_image_pixels,
                         timeout_s=args.media_timeout)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model, processor = load_family(args.model, device=device, dtype=dtype)
    tokenizer = processor.tokenizer
    engine = Engine(model, max_batch=args.max_batch, kv_memory_bytes=int(args.kv_memory * (1 << 30)),
                    chunk_tokens=args.chunk_tokens, max_queue=args.max_queue,
                    encoder_cache_bytes=int(args.encoder_cache_mib * (1 << 20)),
                    prefix_cache_bytes=int(args.prefix_cache_mib * (1 << 20)),
                    decode_text=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    name = args.served_model_name or Path(args.model).resolve().name
    config = ServerConfig(model_name=name, api_key=args.api_key or None, media=policy, max_images=args.max_images,
                          default_max_tokens=args.default_max_tokens)
    return engine, processor, config


def make_server(app, sock: socket.socket, *, log_level: str = "warning", on_exit=None):
    """A uvicorn server on a bound socket whose first SIGTERM / SIGINT also calls on_exit()
    (the engine stops taking requests) before uvicorn's graceful shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if on_exit is not None:
                on_exit()
            super().handle_exit(sig, frame)
            # uvicorn raises the signal again once it has shut down, which would kill the process
            # before the engine stops: a drained shutdown exits 0 instead
            self._captured_signals.clear()

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=None, access_log=False,
                            timeout_keep_alive=5)
    return Server(config)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_serve(args: argparse.Namespace) -> int:
    from vlmfast.serving.app import create_app

    engine, processor, config = build(args)
    engine.start()
    app = create_app(engine, processor, config)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    server = make_server(app, sock, log_level=args.log_level, on_exit=engine.refuse_new)
    print(f"vlmfast serve: {config.model_name} on http://{host}:{port} (max batch {engine.pool.rows}, context "
          f"{engine.max_len} tokens, {engine.device})", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop(drain=True)
    return 0
