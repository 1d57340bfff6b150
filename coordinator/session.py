"""Worker processes and the message loop: start or attach both workers, run requests, shut down cleanly.

Owns the ROUTER socket, the worker processes (spawned here or started elsewhere and attached by
endpoint), the READY handshake with a deadline, liveness (a dead child or a silent attached worker
becomes WorkerDied within a second or two, never a hang), and the log of every message and span.
Executes the actions of coordinator.spec for one request at a time. Never imports torch.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from protocol import messages as m
from protocol.transport import Channel, check_endpoint, ipc_endpoint, make_socket, private_ipc_dir

from .costs import CostTracker, Plan
from .spec import Decode, Finish, Rebase, RequestState, StopDraft, Verify   # actions; protocol messages are m.*

POLL_MS = 50


class WorkerDied(Exception):
    pass


class StartupError(Exception):
    pass


class RequestFailed(Exception):
    pass


@dataclass
class WorkerSpec:
    role: str                           # draft | target
    backend: str
    options: dict = field(default_factory=dict)
    endpoint: str | None = None          # attach: bind here and wait for a worker started elsewhere
    env: dict = field(default_factory=dict)


@dataclass
class WorkerHandle:
    spec: WorkerSpec
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    ready: m.Ready | None = None
    hello: m.Hello | None = None
    last_seen: float = 0.0
    last_error: str = ""

    @property
    def name(self) -> str:
        return self.spec.role

    def log_tail(self, lines: int = 6) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])


def worker_command(spec: WorkerSpec, endpoint: str, parent_pid: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "workers", "--role", spec.role, "--backend", spec.backend, "--connect", endpoint,
           "--options-json", json.dumps(spec.options)]
    if parent_pid:
        cmd += ["--parent-pid", str(parent_pid)]
    return cmd


class Session:
    def __init__(self, specs: list[WorkerSpec], *, log_dir: Path, startup_timeout_s: float = 120.0,
                 request_timeout_s: float = 600.0, heartbeat_timeout_s: float = 30.0,
                 allow_public_endpoint: bool = False, progress=None):
        self.events: list[dict] = []
        self.log_dir = Path(log_dir)
        self.startup_timeout_s = startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.ctx = zmq.Context()
        sock = make_socket(self.ctx, zmq.ROUTER)
        self.ipc_dir = private_ipc_dir()
        self.endpoint = ipc_endpoint(self.ipc_dir, "coordinator")
        sock.bind(self.endpoint)
        for spec in specs:
            if spec.endpoint:
                sock.bind(check_endpoint(spec.endpoint, allow_public=allow_public_endpoint))
        self.chan = Channel(sock, "coordinator", router=True)
        self.workers = {spec.role: WorkerHandle(spec) for spec in specs}
        self._sent: dict[str, dict] = {}          # msg_id -> event, to join recv stamps from DONE
        self._request_no = 0
        self.tag = uuid.uuid4().hex[:6]            # request ids stay unique across sessions of one run
        self.context: dict = {}                   # sample_id / mode of the request in flight
        self.progress = progress
        self.costs = CostTracker()                # measured step costs: whether drafting can pay
        self._warned_sequences: set = set()

    # --- processes -------------------------------------------------------------------------

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for handle in self.workers.values():
            if handle.spec.endpoint:
                continue
            handle.log_path = self.log_dir / f"{handle.name}.log"
            log = open(handle.log_path, "wb")
            env = {**os.environ, **handle.spec.env, "PYTHONUNBUFFERED": "1"}
            handle.proc = subprocess.Popen(worker_command(handle.spec, self.endpoint, os.getpid()),
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=env, preexec_fn=_ignore_sigint)
            log.close()
            handle.last_seen = time.monotonic()
        self._await_ready()

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while any(h.ready is None for h in self.workers.values()):
            if time.monotonic() > deadline:
                missing = [h for h in self.workers.values() if h.ready is None]
                parts = []
                for h in missing:
                    where = f"attached at {h.spec.endpoint}" if h.spec.endpoint else f"pid {h.proc.pid}"
                    state = "said hello but did not finish loading" if h.hello else "never answered"
                    parts.append(f"{h.name} worker ({where}) {state} within {self.startup_timeout_s:g} s"
                                 + (f"; last log lines:\n{h.log_tail()}" if h.log_tail() else ""))
                raise StartupError("; ".join(parts) + ". Raise --startup-timeout if loading is just slow.")
            msg = self._recv_raw(POLL_MS)
            if msg is None:
                continue
            handle = self.workers.get(msg.src)
            if handle is None:
                continue
            if isinstance(msg, m.Hello):
                handle.hello = msg
            elif isinstance(msg, m.Ready):
                handle.ready = msg
            elif isinstance(msg, m.Heartbeat) and handle.ready is None:
                self.send(m.Hello(), handle.name)      # an attached worker that announced itself earlier
            elif isinstance(msg, m.Error) and msg.fatal:
                raise WorkerDied(f"{handle.name} worker failed to start: {msg.reason}")

    def check_workers(self) -> None:
        now = time.monotonic()
        for h in self.workers.values():
            if h.proc is not None:
                code = h.proc.poll()
                if code is not None:
                    raise WorkerDied(self._death_message(h, code))
            elif h.ready is not None and now - h.last_seen > self.heartbeat_timeout_s:
                raise WorkerDied(f"{h.name} worker at {h.spec.endpoint} sent nothing for "
                                 f"{now - h.last_seen:.0f} s (no heartbeat); is it still running?")

    def _death_message(self, h: WorkerHandle, code: int) -> str:
        how = f"killed by signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exit code {code}"
        if code == -signal.SIGKILL:
            how += "; out of memory or kill -9?"
        text = f"{h.name} worker (pid {h.proc.pid}) died: {how}"
        if h.last_error:
            text += f"; last error: {h.last_error}"
        tail = h.log_tail()
        if tail:
            text += f"\n--- last lines of {h.log_path} ---\n{tail}"
        return text

    def close(self) -> None:
        """Shut every spawned worker down, escalating to SIGKILL; never leaves a process behind."""
        spawned = [h for h in self.workers.values() if h.proc is not None and h.proc.poll() is None]
        for h in spawned:
            try:
                self.send(m.Shutdown(reason="run finished"), h.name)
            except Exception:
                pass
        deadline = time.monotonic() + 5
        for h in spawned:
            try:
                h.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                h.proc.terminate()
        for h in spawned:
            try:
                h.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                h.proc.kill()
                h.proc.wait(timeout=5)
        self.chan.close()
        self.ctx.term()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    # --- messages --------------------------------------------------------------------------

    def send(self, msg: m.Message, to: str) -> m.Message:
        try:
            self.chan.send(msg, to=to)
        except zmq.ZMQError as exc:
            raise WorkerDied(f"{to} worker is not connected ({exc})") from None
        self._log_message(msg)
        return msg

    def _log_message(self, msg: m.Message) -> None:
        event = {"kind": "message", "type": msg.type, "src": msg.src, "dst": msg.dst or "coordinator",
                 "request_id": msg.request_id, "msg_id": msg.msg_id, "sent_ns": msg.sent_ns,
                 "recv_ns": msg.recv_ns or None, **self.context}
        if isinstance(msg, (m.Draft, m.Verify)):      # which answer positions: the pipeline is visible in the log
            event.update(start_pos=msg.start_pos, n_tokens=len(msg.tokens))
        elif isinstance(msg, m.Rebase):
            event.update(epoch=msg.epoch, committed_len=len(msg.committed), max_ahead=msg.max_ahead)
        if msg.src == "coordinator":
            self._sent[msg.msg_id] = event
        self.events.append(event)

    def _recv_raw(self, timeout_ms: float) -> m.Message | None:
        self.check_workers()
        msg, bad = self.chan.recv(timeout_ms)
        if bad:
            sender = bad.split(":", 1)[0]
            print(f"coordinator: rejected a malformed message from {bad}", file=sys.stderr)
            if sender in self.workers:
                self.send(m.Error(reason=f"malformed message rejected: {bad}"), sender)
            return None
        if msg is None:
            return None
        msg.dst = "coordinator"
        handle = self.workers.get(msg.src)
        if handle is not None:
            handle.last_seen = time.monotonic()
            if isinstance(msg, m.Error):
                handle.last_error = msg.reason
        self._log_message(msg)
        return msg

    def recv(self, deadline: float, timeout_ok: bool = False) -> m.Message | None:
        while True:
            if time.monotonic() > deadline:
                if timeout_ok:
                    return None
                raise RequestFailed(f"no answer from the workers within {self.request_timeout_s:g} s "
                                    f"(request timeout)")
            msg = self._recv_raw(POLL_MS)
            if msg is None or isinstance(msg, m.Heartbeat):
                continue
            if isinstance(msg, m.Error) and msg.fatal:
                raise WorkerDied(f"{msg.src} worker reported a fatal error: {msg.reason}")
            return msg

    # --- one request -----------------------------------------------------------------------

    def run_request(self, sample: dict, mode: str, *, question: str, max_new_tokens: int,
                    options: dict | None = None, k_max: int = 16, adaptive: bool = True,
                    max_ahead: int = 32, wait_for_drafts: int = 0, wait_timeout_ms: float = 200.0,
                    pipeline: str = "auto", draft_policy: str = "auto") -> dict:
        """Run one (sample, mode); returns the result record (status ok or error).

        pipeline: auto (on when the workers report different devices) | on | off. draft_policy: auto (on a
        GPU, coordinator.costs decides from measured costs whether drafting can pay, else the target runs
        alone and the record says why) | always."""
        self._request_no += 1
        rid = f"{self.tag}-r{self._request_no}"
        sample_id = sample.get("sample_id", "")
        self.context = {"sample_id": sample_id, "mode": mode}
        options = dict(options or {})
        eos = -1 if options.get("ignore_eos") else self.workers["target"].ready.eos_id
        record = {"sample_id": sample_id, "mode": mode, "request_id": rid, "question": question,
                  "status": "ok", "error": None}
        pipelined, plan, key = False, None, ""
        if mode in ("parallel", "speculative"):
            pipelined, plan, key = self._plan(mode, options, pipeline, draft_policy, k_max, max_new_tokens)
            record.update(pipelined=pipelined, draft_stood_aside=None if plan is None or plan.draft else plan.reason,
                          draft_plan=_plan_record(plan), **self._adapter_check(sample))
        state = RequestState(mode=mode, max_new_tokens=max_new_tokens, eos_id=eos, k_max=k_max, adaptive=adaptive,
                             wait_for_drafts=wait_for_drafts, pipelined=pipelined, max_ahead=max_ahead,
                             k_start=plan.k if plan is not None and plan.draft else None,
                             min_mean_len=plan.min_mean_len if plan is not None else None,
                             stood_aside=record.get("draft_stood_aside"))
        roles = ["target"] if mode in ("baseline", "hf-generate") else ["draft", "target"]
        draft_options = dict(options, stand_aside=state.stood_aside) if state.stood_aside else options
        msgs = {role: m.Prefill(request_id=rid, mode=mode, sample=sample, question=question,
                                max_new_tokens=max_new_tokens, max_ahead=0 if state.stood_aside else max_ahead,
                                options=draft_options if role == "draft" else options)
                for role in roles}
        start_ns = time.monotonic_ns()
        for role in roles:                       # both at the same moment
            self.send(msgs[role], role)
        req = _Request(rid=rid, state=state, draft_active="draft" in roles)     # owes the draft a STOP
        deadline = time.monotonic() + self.request_timeout_s
        try:
            while not state.finished:
                if req.queue:
                    msg = req.queue.pop(0)
                elif state.waiting:
                    msg = self.recv(min(deadline, time.monotonic() + wait_timeout_ms / 1e3), timeout_ok=True)
                    if msg is None:
                        self._execute(req, state.on_wait_timeout(), time.monotonic_ns())
                        continue
                else:
                    msg = self.recv(deadline)
                if msg.request_id != rid:
                    continue                         # a straggler from an earlier request
                if isinstance(msg, (m.PrefillDone, m.VerifyResult, m.DecodeResult)):
                    # the socket queues fairly per peer: drafts sent before this result may still wait behind
                    # it; take them first, so the next window holds every draft that exists
                    for extra in self._waiting_messages():
                        if isinstance(extra, m.Draft) and extra.request_id == rid:
                            self._execute(req, self._event(req, extra), extra.recv_ns)
                        else:
                            req.queue.append(extra)
                self._execute(req, self._event(req, msg), msg.recv_ns)
        except RequestFailed as exc:
            record.update(status="error", error=str(exc))
        end_ns = req.end_ns or time.monotonic_ns()
        for role in roles:
            if role == "target" or req.draft_active:
                self.send(m.Stop(request_id=rid, reason="request complete"), role)
        dones = self._collect_done(rid, roles, req.early_dones)
        record.update(self._measure(state, dones, start_ns, end_ns, req.ttft_ns, mode))
        record.update(req.info)
        if record["status"] == "ok" and mode != "hf-generate":
            self.costs.observe(key=key, drafting=state.drafting, spans={r: d.spans for r, d in dones.items()},
                               free_drafts=state.free_draft_tokens, hits=state.hits, misses=state.misses)
        return record

    def _waiting_messages(self) -> list[m.Message]:
        """Every message already received, without waiting (heartbeats dropped, fatal errors raised)."""
        out = []
        while (msg := self._recv_raw(0)) is not None:
            if isinstance(msg, m.Error) and msg.fatal:
                raise WorkerDied(f"{msg.src} worker reported a fatal error: {msg.reason}")
            if not isinstance(msg, m.Heartbeat):
                out.append(msg)
        return out

    def _event(self, req: "_Request", msg: m.Message) -> list:
        """Feed one worker message of this request to coordinator.spec; returns its actions."""
        state = req.state
        if isinstance(msg, m.Error):
            raise RequestFailed(msg.reason)
        if isinstance(msg, m.Done):
            req.early_dones[msg.src] = msg
        elif isinstance(msg, m.Draft) and msg.src == "draft":
            for i, row in enumerate(msg.arrays.get("probs", ())):
                req.probs[(msg.epoch, msg.start_pos + i)] = row
            return state.on_draft(msg.epoch, msg.start_pos, msg.tokens)
        elif isinstance(msg, m.PrefillDone) and msg.src == "target":
            req.ttft_ns = msg.recv_ns
            req.info.update(target_prompt_len=msg.prompt_len, target_inputs=msg.info)
            return state.on_prefill_done(msg.first_token)
        elif isinstance(msg, m.VerifyResult):
            return state.on_verify_result(msg.accepted, msg.next_token)
        elif isinstance(msg, m.DecodeResult):
            return state.on_decode_result(msg.tokens)
        return []

    def _execute(self, req: "_Request", actions: list, now_ns: int) -> None:
        """Map coordinator.spec's actions to messages."""
        for action in actions:
            if isinstance(action, Verify):
                verify = m.Verify(request_id=req.rid, start_pos=action.start_pos, tokens=action.tokens)
                if req.probs and action.tokens:
                    rows = [req.probs.get((action.epoch, action.start_pos + i)) for i in range(len(action.tokens))]
                    if any(r is None for r in rows):
                        raise RequestFailed("sampling: the draft sent no probabilities for some drafted tokens")
                    verify.arrays["probs"] = np.stack(rows)
                self.send(verify, "target")
            elif isinstance(action, Rebase):
                if req.draft_active:
                    self.send(m.Rebase(request_id=req.rid, epoch=action.epoch, committed=action.committed,
                                       max_ahead=action.max_ahead), "draft")
            elif isinstance(action, Decode):
                self.send(m.Decode(request_id=req.rid, max_tokens=action.count), "target")
            elif isinstance(action, StopDraft):
                if req.draft_active:
                    self.send(m.Stop(request_id=req.rid, reason=action.reason), "draft")
                    req.draft_active = False
            elif isinstance(action, Finish):
                req.end_ns = now_ns

    def _plan(self, mode, options, pipeline, draft_policy, k_max, max_new_tokens) -> tuple[bool, Plan | None, str]:
        """Pipelined or not, and (on a GPU, draft_policy auto) whether drafting can pay: coordinator.costs."""
        pipelined = pipeline == "on" or (pipeline == "auto" and self.separate_devices())
        key = _draft_key(options, self.workers["draft"].ready)
        plan = None
        if draft_policy == "auto" and self.workers["target"].ready.device.startswith("cuda"):
            plan = self.costs.decide(key, mode=mode, pipelined=pipelined, k_max=k_max, max_new_tokens=max_new_tokens)
        return pipelined, plan, key

    def separate_devices(self) -> bool:
        """Whether the workers report different devices (then the draft is pipelined)."""
        draft, target = self.workers.get("draft"), self.workers.get("target")
        if draft is None or draft.ready is None or target.ready is None:
            return False
        return _device_name(draft.ready.device) != _device_name(target.ready.device)

    def _adapter_check(self, sample: dict) -> dict:
        """A sample from a sequence the draft's adapter was trained or selected on inflates its acceptance."""
        adapter = (self.workers["draft"].ready.info or {}).get("adapter")
        if not adapter:
            return {}
        split = adapter_seen_split(adapter, sample.get("sequence"))
        if split and sample.get("sequence") not in self._warned_sequences:
            self._warned_sequences.add(sample.get("sequence"))
            print(f"warning: sequence {sample.get('sequence')!r} is in the {split} split of the adapter "
                  f"{adapter.get('path')}: its acceptance there is not a held-out number", file=sys.stderr)
        return {"adapter_seen_split": split}

    def run_draft_alone(self, sample: dict, *, question: str, steps: int, options: dict | None = None) -> dict:
        """The draft's prefill and `steps` decode steps with the target idle: its uncontended step time."""
        self._request_no += 1
        rid = f"{self.tag}-r{self._request_no}"
        self.context = {"sample_id": sample.get("sample_id", ""), "mode": "draft-alone"}
        opts = dict(options or {}, ignore_eos=True)
        self.send(m.Prefill(request_id=rid, mode="draft-alone", sample=sample, question=question,
                            max_new_tokens=steps + 1, max_ahead=steps + 1, options=opts), "draft")
        deadline = time.monotonic() + self.request_timeout_s
        have = 0
        while have < steps + 1:
            msg = self.recv(deadline)
            if msg.request_id != rid:
                continue
            if isinstance(msg, m.Error):
                raise RequestFailed(msg.reason)
            if isinstance(msg, m.Draft):
                have = max(have, msg.start_pos + len(msg.tokens))
        self.send(m.Stop(request_id=rid), "draft")
        done = self._collect_done(rid, ["draft"], {})["draft"]
        steps_ms = [(e - s) / 1e6 for n, s, e, _ in done.spans if n == "draft_step"]
        prefill_ms = [(e - s) / 1e6 for n, s, e, _ in done.spans if n == "prefill"]
        return {"sample_id": sample.get("sample_id"), "draft_step_ms": steps_ms,
                "prefill_ms": prefill_ms[0] if prefill_ms else None}

    def _collect_done(self, rid: str, roles: list[str], early: dict) -> dict[str, m.Done]:
        dones: dict[str, m.Done] = {}
        pending = list(early.values())
        deadline = time.monotonic() + 30
        while len(dones) < len(roles):
            if time.monotonic() > deadline:
                raise WorkerDied(f"worker(s) {sorted(set(roles) - set(dones))} did not confirm the end of request "
                                 f"{rid} within 30 s")
            msg = pending.pop() if pending else self._recv_raw(POLL_MS)
            if isinstance(msg, m.Done) and msg.request_id == rid:
                dones[msg.src] = msg
                for msg_id, _type, recv_ns in msg.received:
                    if msg_id in self._sent:
                        self._sent[msg_id]["recv_ns"] = recv_ns
                for name, start, end, attrs in msg.spans:
                    self.events.append({"kind": "span", "name": name, "proc": msg.src, "start_ns": start,
                                        "end_ns": end, "request_id": rid, "attrs": attrs, **self.context})
            elif isinstance(msg, m.Error) and msg.fatal:
                raise WorkerDied(f"{msg.src} worker reported a fatal error: {msg.reason}")
        return dones

    def _measure(self, state: RequestState, dones: dict, start_ns: int, end_ns: int, ttft_ns, mode) -> dict:
        spans = {role: done.spans for role, done in dones.items()}

        def total(role, *names):
            picked = [(e - s) for n, s, e, _ in spans.get(role, []) if n in names]
            return sum(picked) / 1e6 if picked else None

        def count(role, *names):
            return sum(1 for n, *_ in spans.get(role, []) if n in names)

        def end_of(role, name):
            ends = [e for n, s, e, _ in spans.get(role, []) if n == name]
            return max(ends) if ends else None

        out_ids = state.output
        rec = {
            "output_ids": out_ids,
            "text": dones["target"].stats.get("text") if "target" in dones else None,
            "committed_ids": list(state.committed),
            "wall_ms": (end_ns - start_ns) / 1e6,
            "ttft_ms": (ttft_ns - start_ns) / 1e6 if ttft_ns else None,
            "request_start_ns": start_ns,
            "request_end_ns": end_ns,
        }
        target_steps = count("target", "decode", "verify")
        target_decode_ms = total("target", "decode", "verify")
        rec["target"] = {
            "load_ms": total("target", "load_inputs"),
            "prefill_ms": total("target", "prefill"),
            "decode_ms": target_decode_ms,
            "hf_generate_ms": total("target", "hf_generate"),
            "tokens": len(out_ids),
            "forward_passes": target_steps,
            "ms_per_token": (target_decode_ms / max(1, len(state.committed) - 1)) if target_steps else None,
            "prompt_len": dones.get("target").stats.get("prompt_len") if "target" in dones else None,
            "memory": dones["target"].stats.get("memory") if "target" in dones else None,
        }
        if "draft" in dones:
            steps = count("draft", "draft_step")
            draft_decode_ms = total("draft", "draft_step")
            rec["draft"] = {
                "load_ms": total("draft", "load_inputs"),
                "prefill_ms": total("draft", "prefill"),
                "decode_ms": draft_decode_ms,
                "tokens": steps + 1 if total("draft", "prefill") is not None else 0,
                "ms_per_token": draft_decode_ms / steps if steps else None,
                "rebase_ms": total("draft", "rebase"),
                "prompt_len": dones["draft"].stats.get("prompt_len"),
                "memory": dones["draft"].stats.get("memory"),
            }
            draft_ready = end_of("draft", "prefill")
            target_ready = end_of("target", "prefill")
            rec["overlap_window_ms"] = (max(0, target_ready - draft_ready) / 1e6
                                        if draft_ready and target_ready else None)
        else:
            rec["draft"] = None
            rec["overlap_window_ms"] = None
        drafting = mode in ("parallel", "speculative")
        rec.update({
            "free_draft_tokens": state.free_draft_tokens if drafting else None,
            "drafted_tokens": state.drafted if drafting else None,
            "accepted_tokens": state.accepted if drafting else None,
            "acceptance_rate": (state.accepted / state.drafted if state.drafted else None) if drafting else None,
            "verify_rounds": state.rounds if drafting else None,
            "mean_acceptance_length": (1 + state.accepted / state.rounds if state.rounds else None) if drafting else None,
            "verify_ms": (total("target", "verify") or 0.0) if drafting else None,
            "verify_rounds_detail": state.per_round if drafting else None,
            "draft_alpha_estimate": state.alpha_estimate if drafting else None,
        })
        return rec


@dataclass
class _Request:
    """What the request loop keeps besides coordinator.spec's state."""

    rid: str
    state: RequestState
    draft_active: bool
    probs: dict = field(default_factory=dict)      # (epoch, position) -> the draft's q row, when sampling
    end_ns: int | None = None
    ttft_ns: int | None = None
    info: dict = field(default_factory=dict)
    early_dones: dict = field(default_factory=dict)
    queue: list = field(default_factory=list)        # messages taken early, handled in order next


def adapter_seen_split(adapter: dict, sequence: str | None) -> str | None:
    """'train' or 'val' when the adapter checkpoint (READY info) lists `sequence` in that split, else None."""
    recorded = adapter.get("sequences") or {}
    for split in ("train", "val"):
        if sequence is not None and sequence in (recorded.get(split) or []):
            return split
    return None


def _device_name(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


def _draft_key(options: dict, draft_ready) -> str:
    """The draft strategy a request uses (acceptance is measured per strategy): oracle settings or adapter."""
    oracle = options.get("oracle") or {}
    adapter = ((draft_ready.info or {}).get("adapter") or {}).get("path") if draft_ready else None
    parts = {k: v for k, v in oracle.items() if k in ("alpha", "profile")}
    return json.dumps({"oracle": parts, "adapter": adapter} if parts else {"adapter": adapter}, sort_keys=True)


def _plan_record(plan: Plan | None) -> dict | None:
    if plan is None:
        return None
    return {"draft": plan.draft, "reason": plan.reason, "k": plan.k, "predicted_speedup": plan.predicted_speedup,
            "min_mean_len": plan.min_mean_len}


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the coordinator, which shuts them down in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
