"""One request at a time through both workers: the coordinator's request loop.

Decides per request whether the draft is pipelined and whether it drafts at all (coordinator.costs, from
the costs measured in this session), sends PREFILL to the workers a request needs, maps what arrives to
coordinator.spec's events and its actions to messages, and turns the result into a record
(coordinator.metrics). Processes, routing and liveness live in coordinator.supervisor, which Session
extends. Never imports torch.
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from protocol import messages as m

from .costs import CostTracker, Plan, first_window, turn_window
from .metrics import draft_alone_timing, measure_request
from .spec import Decode, Finish, Rebase, RequestState, StopDraft, Verify   # actions; protocol messages are m.*
from .supervisor import (POLL_MS, RequestFailed, StartupError, Supervisor, WorkerDied, WorkerHandle,  # noqa: F401
                         WorkerSpec, worker_command)


class Session(Supervisor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._request_no = 0
        self.tag = uuid.uuid4().hex[:6]            # request ids stay unique across sessions of one run
        self.costs = CostTracker()                # measured step costs: whether drafting can pay
        self._warned_sequences: set = set()

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
        margin = RequestState.lookahead_margin
        if mode == "speculative" and not pipelined and self.shared_gpu() and wait_for_drafts == 0:
            # one GPU: the cost model prices a round as k draft steps, then the verification, in turn. Run it
            # so: full windows, and no draft steps past the window while the target verifies. Otherwise both
            # processes compute at once and each step takes a share of the GPU (measured on an H200: draft
            # steps 7.1 ms instead of 3.6, verifications 10 ms instead of 5; speculative at 0.83-0.87x)
            # The window stays at the plan's best k for the measured acceptance: growing it after each fully
            # accepted round (the adaptive rule) drafted ~6 a round at alpha 0.9 where 2 is best (measured:
            # 0.87x with the window growing, against 1.05x predicted)
            k_max = turn_window(plan, k_max)
            wait_for_drafts, margin = k_max, 0
        state = RequestState(mode=mode, max_new_tokens=max_new_tokens, eos_id=eos, k_max=k_max, adaptive=adaptive,
                             wait_for_drafts=wait_for_drafts, pipelined=pipelined, max_ahead=max_ahead,
                             lookahead_margin=margin,
                             k_start=first_window(plan, k_max) if mode == "speculative" else None,
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
        try:
            while not state.finished:
                if req.queue:
                    msg = req.queue.pop(0)
                elif state.waiting:
                    msg = self.recv(time.monotonic() + wait_timeout_ms / 1e3, timeout_ok=True)
                    if msg is None:
                        self._execute(req, state.on_wait_timeout(), time.monotonic_ns())
                        continue
                else:
                    msg = self.recv()
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
        dones = self.collect_done(rid, roles, req.early_dones)
        record.update(measure_request(state, dones, start_ns, end_ns, req.ttft_ns, mode))
        record.update(req.info)
        if record["status"] == "ok" and mode != "hf-generate":
            self.costs.observe(key=key, drafting=state.drafting, spans={r: d.spans for r, d in dones.items()},
                               free_drafts=state.free_draft_tokens, hits=state.hits, misses=state.misses,
                               shared_device=self.shared_gpu(), mode=mode,
                               tokens=(record.get("target") or {}).get("tokens"))
        return record

    def _waiting_messages(self) -> list[m.Message]:
        """Every message already received, without waiting (heartbeats dropped, fatal errors raised)."""
        out = []
        while (msg := self._recv_raw(0)) is not None:
            if isinstance(msg, m.Error) and msg.fatal:
                raise WorkerDied(self._fatal_message(msg))
            if not isinstance(msg, m.Heartbeat):
                self._active_at = time.monotonic()
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

    def shared_gpu(self) -> bool:
        """Both workers on one CUDA device: their GPU work shares it whenever it overlaps."""
        draft, target = self.workers.get("draft"), self.workers.get("target")
        if draft is None or draft.ready is None or target.ready is None:
            return False
        return target.ready.device.startswith("cuda") and not self.separate_devices()

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
        have = 0
        while have < steps + 1:
            msg = self.recv()
            if msg.request_id != rid:
                continue
            if isinstance(msg, m.Error):
                raise RequestFailed(msg.reason)
            if isinstance(msg, m.Draft):
                have = max(have, msg.start_pos + len(msg.tokens))
        self.send(m.Stop(request_id=rid), "draft")
        done = self.collect_done(rid, ["draft"], {})["draft"]
        return {"sample_id": sample.get("sample_id"), **draft_alone_timing(done.spans)}


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
