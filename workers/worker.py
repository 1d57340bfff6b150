"""One worker process: one model, one role (draft or target), one DEALER socket to the coordinator.

Owns the request life cycle on the model side and the compute spans (GPU synchronised before each end
stamp). The draft streams tokens as soon as they exist and checks its socket between steps; the target
prefills, verifies and decodes when told. Never decides what to verify or when: the coordinator does.
Any failure on a request is answered with ERROR; nothing a request carries may kill the process.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager

import numpy as np
import zmq

from protocol import messages as m
from protocol.transport import Channel, make_socket
from workers.oracle import Oracle

HEARTBEAT_S = 1.0


class RequestAborted(Exception):
    """The coordinator stopped the request (STOP) or the worker (SHUTDOWN) mid-way."""

    def __init__(self, shutdown: bool = False):
        super().__init__("stopped")
        self.shutdown = shutdown


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the process that spawned us dies, so no worker outlives its coordinator."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Worker:
    def __init__(self, args: argparse.Namespace, options: dict):
        from workers.backends.base import make_backend

        self.role = args.role
        self.name = args.name or args.role
        self.parent_pid = args.parent_pid
        self.ctx = zmq.Context()
        sock = make_socket(self.ctx, zmq.DEALER, identity=self.name)
        sock.connect(args.connect)
        self.chan = Channel(sock, self.name, router=False)
        self.backend_name = args.backend
        self.backend = make_backend(args.backend, self.role, options)
        self.ready: m.Ready | None = None
        self._reset_request("")

    # --- bookkeeping ---------------------------------------------------------------------

    def _reset_request(self, request_id: str) -> None:
        self.request_id = request_id
        self.spans: list = []
        self.received: list = []
        self.stats: dict = {}
        self.request_max_new = 0
        self.oracle = None
        self.generated: list[int] = []
        self.draft_probs: dict = {}

    @contextmanager
    def span(self, name: str, **attrs):
        start = time.monotonic_ns()
        yield attrs
        self.backend.sync()
        self.spans.append([name, start, time.monotonic_ns(), attrs])

    def send(self, msg: m.Message) -> None:
        msg.request_id = msg.request_id or self.request_id
        self.chan.send(msg, to="coordinator")

    def recv(self, timeout_ms: float) -> m.Message | None:
        msg, bad = self.chan.recv(timeout_ms)
        if bad:
            self.send(m.Error(reason=f"malformed message rejected: {bad}"))
            return None
        if msg is not None and msg.request_id and msg.request_id == self.request_id:
            self.received.append([msg.msg_id, msg.type, msg.recv_ns])
        return msg

    # --- life cycle ----------------------------------------------------------------------

    def run(self) -> int:
        self.send(m.Hello(role=self.role, pid=os.getpid(), backend=self.backend_name))
        try:
            info = self.backend.load()
            try:                  # the bench's floor column; never a reason for a worker not to start
                step_bytes = self.backend.step_bytes()
            except Exception as exc:
                step_bytes = {"error": f"{type(exc).__name__}: {exc}"}
            info["info"] = dict(info.get("info") or {}, step_bytes=step_bytes)
        except Exception as exc:
            self.send(m.Error(reason=f"{self.name}: loading backend {self.backend_name!r} failed: {exc}",
                              fatal=True))
            traceback.print_exc()
            time.sleep(0.2)   # let the message leave before the socket closes
            return 2
        self.ready = m.Ready(role=self.role, pid=os.getpid(), backend=self.backend_name,
                             memory=self.backend.memory(), **info)
        self.send(self.ready)
        last_beat = time.monotonic()
        while True:
            msg = self.recv(HEARTBEAT_S * 1000)
            if self.parent_pid and os.getppid() != self.parent_pid:
                return 1          # the coordinator is gone
            if msg is None:
                if time.monotonic() - last_beat >= HEARTBEAT_S:
                    self.send(m.Heartbeat(busy=False))
                    last_beat = time.monotonic()
                continue
            if isinstance(msg, m.Shutdown):
                return 0
            if isinstance(msg, m.Hello):          # a new coordinator asks who we are
                self.ready.msg_id = ""
                self.send(self.ready)
            elif isinstance(msg, m.Prefill):
                if self.serve(msg):
                    return 0
            elif isinstance(msg, m.Stop):
                self.send(m.Done(request_id=msg.request_id))
            else:
                self.send(m.Error(request_id=msg.request_id, in_reply_to=msg.msg_id,
                                  reason=f"{self.name}: unexpected {msg.type!r} while idle"))

    def serve(self, prefill: m.Prefill) -> bool:
        """Handle one request until STOP. Returns True if a SHUTDOWN arrived."""
        self._reset_request(prefill.request_id)
        self.request_max_new = prefill.max_new_tokens
        self.received.append([prefill.msg_id, prefill.type, prefill.recv_ns])
        try:
            if self.role == "draft":
                self._serve_draft(prefill)
            else:
                self._serve_target(prefill)
        except RequestAborted as stop:
            return self._finish(stop.shutdown)
        except Exception as exc:
            fatal = "CUDA" in str(exc) or isinstance(exc, MemoryError)
            kind = type(exc).__name__
            detail = str(exc) if kind == "InputError" else f"{kind}: {exc}"
            traceback.print_exc()
            self.send(m.Error(reason=f"{self.name}: {detail}", fatal=fatal))
            if fatal:
                raise SystemExit(3)
        # wait for the coordinator's STOP to close the request
        while True:
            msg = self.recv(HEARTBEAT_S * 1000)
            if isinstance(msg, (m.Stop, m.Shutdown)):
                return self._finish(isinstance(msg, m.Shutdown))
            if msg is not None and not isinstance(msg, (m.Rebase, m.Verify, m.Decode)):
                self.send(m.Error(reason=f"{self.name}: unexpected {msg.type!r} after the request ended"))

    def _finish(self, shutdown: bool) -> bool:
        self.stats["memory"] = self.backend.memory()
        if self.role == "target" and self.backend.engine is not None and self.request_max_new:
            answer = self.backend.engine.tokens[: self.request_max_new]
            if self.backend.eos_id in answer:
                answer = answer[: answer.index(self.backend.eos_id)]
            self.stats["text"] = self.backend.decode_text(answer)
        self.send(m.Done(spans=self.spans, received=self.received, stats=self.stats))
        self.backend.reset()
        self._reset_request("")
        return shutdown

    def _eos(self, prefill: m.Prefill) -> int:
        return -1 if prefill.options.get("ignore_eos") else self.backend.eos_id

    def _prefill(self, prefill: m.Prefill) -> tuple[int, int, dict]:
        opts = dict(prefill.options, max_new_tokens=prefill.max_new_tokens)
        with self.span("load_inputs"):
            prepared = self.backend.prepare(prefill.sample, prefill.question, opts)
        self.oracle = None
        if self.role == "draft" and opts.get("oracle"):
            spec = opts["oracle"]
            self.oracle = Oracle(spec["answer"], alpha=spec.get("alpha"), profile=spec.get("profile"),
                                 seed=int(spec.get("seed", 0)), key=prefill.sample.get("sample_id", ""),
                                 vocab_size=self.backend.vocab_size, eos_id=self.backend.eos_id)
            self.backend.engine.override = self.oracle
        if prefill.mode == "hf-generate":
            with self.span("hf_generate") as attrs:
                tokens = self.backend.hf_generate(prepared, prefill.max_new_tokens, self._eos(prefill))
                attrs["tokens"] = len(tokens)
            self.generated = tokens
            return tokens[0], 0, prepared.info
        with self.span("prefill") as attrs:
            first, prompt_len = self.backend.prefill(prepared)
            attrs["prompt_len"] = prompt_len
        self.stats.update(prompt_len=prompt_len, inputs=prepared.info)
        return first, prompt_len, prepared.info

    # --- target --------------------------------------------------------------------------

    def _serve_target(self, prefill: m.Prefill) -> None:
        first, prompt_len, info = self._prefill(prefill)
        self.send(m.PrefillDone(first_token=first, prompt_len=prompt_len, info=info))
        engine = self.backend.engine
        while True:
            msg = self.recv(HEARTBEAT_S * 1000)
            if msg is None:
                continue
            if isinstance(msg, m.Stop):
                raise RequestAborted()
            if isinstance(msg, m.Shutdown):
                raise RequestAborted(shutdown=True)
            if isinstance(msg, m.Verify):
                committed = len(engine.tokens)
                if msg.start_pos != committed:
                    self.send(m.Error(reason=f"verify at position {msg.start_pos}, but {committed} tokens are "
                                             f"committed", in_reply_to=msg.msg_id))
                    continue
                q = msg.arrays.get("probs")
                if q is not None and q.shape[-1] < self.backend.vocab_size:
                    # the target's vocabulary may extend the draft's (<image>, <video>): q is 0 there
                    q = np.pad(q, ((0, 0), (0, self.backend.vocab_size - q.shape[-1])))
                with self.span("verify", k=len(msg.tokens)):
                    accepted, nxt = engine.verify(msg.tokens, q)
                self.send(m.VerifyResult(start_pos=msg.start_pos, drafted=len(msg.tokens), accepted=accepted,
                                         next_token=nxt))
            elif isinstance(msg, m.Decode):
                if prefill.mode == "hf-generate":
                    self.send(m.DecodeResult(tokens=self.generated[1: 1 + msg.max_tokens]))
                else:
                    self.send(m.DecodeResult(tokens=self._decode_alone(msg.max_tokens, self._eos(prefill))))
            else:
                self.send(m.Error(reason=f"{self.name}: unexpected {msg.type!r} during a request",
                                  in_reply_to=msg.msg_id))

    def _decode_alone(self, max_tokens: int, eos: int) -> list[int]:
        engine = self.backend.engine
        out: list[int] = []
        while len(out) < max_tokens and engine.tokens[-1] != eos:
            with self.span("decode"):
                out.append(engine.step())
            self._poll_abort()
        return out

    def _poll_abort(self) -> None:
        msg = self.recv(0)
        if isinstance(msg, m.Stop):
            raise RequestAborted()
        if isinstance(msg, m.Shutdown):
            raise RequestAborted(shutdown=True)

    # --- draft ---------------------------------------------------------------------------

    def _keep_probs(self) -> None:
        """Sampling: remember the draft's distribution q for the token it just emitted (rejection
        sampling on the target needs q for every drafted token)."""
        engine = self.backend.engine
        if engine.last_probs is not None:
            row = engine.last_probs
            self.draft_probs[len(engine.tokens) - 1] = (row.detach().float().cpu().numpy()
                                                       if hasattr(row, "detach") else np.asarray(row, np.float32))

    def _serve_draft(self, prefill: m.Prefill) -> None:
        self.draft_probs: dict[int, np.ndarray] = {}
        first, _, _ = self._prefill(prefill)
        engine = self.backend.engine
        self._keep_probs()
        eos = self._eos(prefill)
        batch = max(1, int(prefill.options.get("draft_batch", 1)))
        max_total = prefill.max_new_tokens
        max_ahead = prefill.max_ahead
        epoch, committed_len, sent = 0, 0, 0
        drafted_steps = 0
        pending = None

        def flush() -> None:
            nonlocal sent
            tokens = engine.tokens[sent:]
            if tokens:
                msg = m.Draft(epoch=epoch, start_pos=sent, tokens=tokens)
                if self.draft_probs:
                    rows = [self.draft_probs.get(p) for p in range(sent, len(engine.tokens))]
                    if all(r is not None for r in rows):
                        msg.arrays["probs"] = np.stack(rows).astype(np.float32)
                self.send(msg)
                sent = len(engine.tokens)

        flush()
        while True:
            can_draft = (pending is None and engine.tokens[-1] != eos and len(engine.tokens) < max_total
                         and len(engine.tokens) - committed_len < max_ahead)
            msg = self.recv(0 if can_draft else HEARTBEAT_S * 1000)
            if isinstance(msg, m.Stop):
                flush()
                self.stats["draft_steps"] = drafted_steps
                raise RequestAborted()
            if isinstance(msg, m.Shutdown):
                raise RequestAborted(shutdown=True)
            if isinstance(msg, m.Rebase):
                committed_len = len(msg.committed)
                if msg.max_ahead >= 0:
                    max_ahead = msg.max_ahead
                if self.oracle is not None:
                    self.oracle.committed_len = committed_len
                if msg.epoch != epoch:
                    epoch = msg.epoch
                    pending = list(msg.committed)   # applied when drafting resumes: a paused draft
                    sent = committed_len            # must not spend GPU time following the target
                if pending is not None and max_ahead > 0:
                    with self.span("rebase", committed=len(pending)):
                        if engine.rebase(pending) is not None:
                            self._keep_probs()
                    pending = None
                    flush()
                continue
            if msg is not None:
                self.send(m.Error(reason=f"{self.name}: unexpected {msg.type!r} while drafting",
                                  in_reply_to=msg.msg_id))
                continue
            if can_draft:
                with self.span("draft_step", pos=len(engine.tokens)):
                    engine.step()
                self._keep_probs()
                drafted_steps += 1
                if len(engine.tokens) - sent >= batch or engine.tokens[-1] == eos:
                    flush()


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
    try:
        return worker.run()
    except KeyboardInterrupt:
        return 130
    finally:
        worker.chan.close()
        worker.ctx.term()
