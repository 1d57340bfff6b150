"""A worker process's start: the command line, dying with the coordinator, signals, closing the socket.

`python -m workers` lands here. Parses flags into backend options, builds a workers.worker.Worker and runs
its loops; never decides anything about a request. Never imports torch itself (the backend does).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys

import zmq

from workers.worker import Worker


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the process that spawned us dies, so no worker outlives its coordinator."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(prog="python -m workers", description="An eventspec model worker process.")
    p.add_argument("--role", choices=["draft", "target"], required=True)
    p.add_argument("--backend", default=None, help="fake | eventgpt | videollava (default: by role)")
    p.add_argument("--connect", required=True, help="the coordinator's endpoint (ipc://... or tcp://HOST:PORT)")
    p.add_argument("--name", default=None, help="socket identity (default: the role)")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="checkpoint folder")
    p.add_argument("--clip-path", default=None, help="local CLIP folder overriding the config's mm_visual_tower")
    p.add_argument("--precision", default=None, choices=["nf4", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic-weights", default=None, help="build random full-size weights: 7b")
    p.add_argument("--adapter", default=None, help="draft adapter checkpoint")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--options-json", default="{}", help="backend options as a JSON object")
    args = p.parse_args(argv)
    if args.backend is None:
        args.backend = "eventgpt" if args.role == "draft" else "videollava"
    try:
        options = json.loads(args.options_json)
    except json.JSONDecodeError as exc:
        p.error(f"--options-json is not valid JSON: {exc}")
    if not isinstance(options, dict):
        p.error("--options-json must be a JSON object")
    for key in ("model", "clip_path", "precision", "device", "synthetic_weights", "adapter"):
        if getattr(args, key) is not None:
            options.setdefault(key, getattr(args, key))
    options.setdefault("temperature", args.temperature)
    options.setdefault("seed", args.seed)
    options.setdefault("cuda_graphs", not args.no_cuda_graphs)
    return args, options


def main(argv: list[str] | None = None) -> int:
    args, options = parse_args(argv)
    if args.parent_pid:
        _die_with_parent()
        if os.getppid() != args.parent_pid:
            return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        worker = Worker(args, options)
    except ValueError as exc:
        print(f"worker {args.role}: {exc}", file=sys.stderr)
        return 2
    except zmq.ZMQError as exc:
        print(f"worker {args.role}: --connect {args.connect}: {exc}", file=sys.stderr)
        return 2
    try:
        return worker.run()
    except KeyboardInterrupt:
        return 130
    finally:
        worker.close()
