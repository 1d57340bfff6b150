"""One worker process's loops: one model, one role (draft or target), one DEALER socket to the coordinator.

Owns the request life cycle on the model side and the compute spans (GPU synchronised before each end
stamp). The draft streams tokens as soon as they exist and checks its socket between steps, following the
pure state machine coordinator.drafting.DraftState, with one draft strategy per request (workers.proposers);
the target prefills, verifies and decodes when told. Never decides what to verify or when: the coordinator does.
Any failure on a request is answered with ERROR; nothing a request carries may kill the process.
"""
from __future__ import annotations

import argparse
import os
import time
import traceback
from contextlib import contextmanager

import zmq

from protocol import messages as m
from protocol.transport import Channel, make_socket, spin_ms
from workers.draft_loop import DraftLoop
from workers.loop_control import HEARTBEAT_S, Heartbeats, RequestAborted
from workers.oracle import Oracle
from workers.target_loop import TargetLoop


class Worker(DraftLoop, TargetLoop):
    def __init__(self, args: argparse.Namespace, options: dict):
        from workers.backends.base import make_backend

        self.role = args.role
        self.name = args.name or args.role
        self.parent_pid = args.parent_pid
        self.ctx = zmq.Context()
        sock = make_socket(self.ctx, zmq.DEALER, identity=self.name)
        sock.connect(args.connect)
        self.chan = Channel(sock, self.name, router=False)
        self.spin_ms = spin_ms()             # during a request a wait spins this long before it blocks
        self.backend_name = args.backend
        self.backend = make_backend(args.backend, self.role, options)
        self.ready: m.Ready | None = None
        self.heartbeats = Heartbeats(self.chan, busy=lambda: bool(self.request_id))
        self._reset_request("")

    # --- bookkeeping ---------------------------------------------------------------------

    def _reset_request(self, request_id: str) -> None:
        self.request_id = request_id
        self.spans: list = []
        self.received: list = []
        self.stats: dict = {}
        self.request_max_new = 0
        self.proposer = None
        self.generated: list[int] = []
        self.answer_ids: list[int] = []      # target: the committed answer of this request
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
        msg, bad = self.chan.recv(timeout_ms, self.spin_ms if self.request_id else 0.0)
        if bad:
            self.send(m.Error(reason=f"malformed message rejected: {bad}"))
            return None
        if msg is not None and msg.request_id and msg.request_id == self.request_id:
            self.received.append([msg.msg_id, msg.type, msg.recv_ns])
        return msg

    # --- life cycle ----------------------------------------------------------------------

    def run(self) -> int:
        print(f"{self.name} worker (pid {os.getpid()}, backend {self.backend_name}) loading", flush=True)
        self.send(m.Hello(role=self.role, pid=os.getpid(), backend=self.backend_name))
        self.heartbeats.start()         # also while loading and computing
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
            return 2                    # close() lingers until the ERROR has left
        self.ready = m.Ready(role=self.role, pid=os.getpid(), backend=self.backend_name,
                             memory=self.backend.memory(), **info)
        self.send(self.ready)
        print(f"{self.name} worker ready: {self.ready.model_id} on {self.ready.device}", flush=True)
        while True:
            msg = self.recv(HEARTBEAT_S * 1000)
            if self.parent_pid and os.getppid() != self.parent_pid:
                return 1          # the coordinator is gone
            if msg is None:
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
            # a broken device or memory ends the process; bad input never does, whatever its text says
            kind = type(exc).__name__
            fatal = isinstance(exc, MemoryError) or (kind != "InputError" and "CUDA" in str(exc))
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
        if self.role == "target" and self.request_max_new:
            # the text, decoded once from this request's committed ids (never a previous request's engine state)
            answer = self.answer_ids[: self.request_max_new]
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
        if self.role == "draft":
            # one draft strategy per request: the benchmark oracle when asked, else the backend's own
            if opts.get("oracle"):
                self.proposer = Oracle.from_options(opts["oracle"], key=prefill.sample.get("sample_id", ""),
                                                    vocab_size=self.backend.vocab_size, eos_id=self.backend.eos_id)
            else:
                self.proposer = self.backend.proposer(prefill.sample, opts)
            self.proposer.reset()
            self.backend.engine.proposer = self.proposer
        if prefill.mode == "hf-generate":
            with self.span("hf_generate") as attrs:
                tokens = self.backend.hf_generate(prepared, prefill.max_new_tokens, self._eos(prefill))
                attrs["tokens"] = len(tokens)
            self.generated = tokens
            self.answer_ids = tokens[:1]
            return tokens[0], 0, prepared.info
        with self.span("prefill") as attrs:
            first, prompt_len = self.backend.prefill(prepared)
            attrs["prompt_len"] = prompt_len
        self.stats.update(prompt_len=prompt_len, inputs=prepared.info)
        return first, prompt_len, prepared.info

    def close(self) -> None:
        """Stop the heartbeats and close the socket, letting a last message (a fatal ERROR) leave first."""
        self.heartbeats.stop()
        self.chan.close(linger_ms=2000)
        self.ctx.term()
