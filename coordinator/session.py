"""One request at a time through both workers: the coordinator's request loop.

Sends PREFILL to the workers a request needs, maps what arrives to coordinator.spec's actions and the
actions to messages, and turns the result into a record (coordinator.metrics). Processes, routing and
liveness live in coordinator.supervisor, which Session extends. Never imports torch.
"""
from __future__ import annotations

import time
import uuid

import numpy as np

from protocol import messages as m

from .metrics import draft_alone_timing, measure_request
from .spec import RequestState
from .supervisor import (POLL_MS, RequestFailed, StartupError, Supervisor, WorkerDied, WorkerHandle,  # noqa: F401
                         WorkerSpec, worker_command)


class Session(Supervisor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._request_no = 0
        self.tag = uuid.uuid4().hex[:6]            # request ids stay unique across sessions of one run

    # --- one request -----------------------------------------------------------------------

    def run_request(self, sample: dict, mode: str, *, question: str, max_new_tokens: int,
                    options: dict | None = None, k_max: int = 16, adaptive: bool = True,
                    max_ahead: int = 32, wait_for_drafts: int = 0, wait_timeout_ms: float = 200.0) -> dict:
        """Run one (sample, mode); returns the result record (status ok or error)."""
        self._request_no += 1
        rid = f"{self.tag}-r{self._request_no}"
        sample_id = sample.get("sample_id", "")
        self.context = {"sample_id": sample_id, "mode": mode}
        options = dict(options or {})
        eos = -1 if (options or {}).get("ignore_eos") else self.workers["target"].ready.eos_id
        state = RequestState(mode=mode, max_new_tokens=max_new_tokens, eos_id=eos, k_max=k_max,
                             adaptive=adaptive, wait_for_drafts=wait_for_drafts)
        target_only = mode in ("baseline", "hf-generate")
        roles = ["target"] if target_only else ["draft", "target"]
        draft_active = not target_only
        record = {"sample_id": sample_id, "mode": mode, "request_id": rid, "question": question,
                  "status": "ok", "error": None}
        msgs = {role: m.Prefill(request_id=rid, mode=mode, sample=sample, question=question,
                                max_new_tokens=max_new_tokens, max_ahead=max_ahead, options=options)
                for role in roles}
        start_ns = time.monotonic_ns()
        for role in roles:                       # both at the same moment
            self.send(msgs[role], role)
        end_ns = None
        ttft_ns = None
        info = {}
        early_dones: dict[str, m.Done] = {}

        probs: dict[tuple[int, int], object] = {}      # (epoch, position) -> q row, when sampling

        def execute(actions, now_ns):
            nonlocal draft_active, end_ns
            for action in actions:
                if action.kind == "verify":
                    verify = m.Verify(request_id=rid, start_pos=action.start_pos, tokens=action.tokens)
                    if probs and action.tokens:
                        rows = [probs.get((state.epoch, action.start_pos + i)) for i in range(len(action.tokens))]
                        if any(r is None for r in rows):
                            raise RequestFailed("sampling: the draft sent no probabilities for some drafted tokens")
                        verify.arrays["probs"] = np.stack(rows)
                    self.send(verify, "target")
                elif action.kind == "rebase" and draft_active:
                    self.send(m.Rebase(request_id=rid, epoch=action.epoch, committed=action.tokens,
                                       max_ahead=action.count if adaptive else -1), "draft")
                elif action.kind == "decode":
                    self.send(m.Decode(request_id=rid, max_tokens=action.count), "target")
                elif action.kind == "stop_draft" and draft_active:
                    self.send(m.Stop(request_id=rid, reason="parallel mode: drafting is over"), "draft")
                    draft_active = False
                elif action.kind == "finish":
                    end_ns = now_ns
        try:
            while not state.finished:
                if state.waiting:
                    msg = self.recv(time.monotonic() + wait_timeout_ms / 1e3, timeout_ok=True)
                    if msg is None:
                        execute(state.on_wait_timeout(), time.monotonic_ns())
                        continue
                else:
                    msg = self.recv()
                if msg.request_id != rid:
                    continue                     # a straggler from an earlier request
                actions = []
                if isinstance(msg, m.Error):
                    raise RequestFailed(msg.reason)
                if isinstance(msg, m.Done):
                    early_dones[msg.src] = msg
                elif isinstance(msg, m.Draft) and msg.src == "draft":
                    if "probs" in msg.arrays:
                        for i, row in enumerate(msg.arrays["probs"]):
                            probs[(msg.epoch, msg.start_pos + i)] = row
                    actions = state.on_draft(msg.epoch, msg.start_pos, msg.tokens)
                elif isinstance(msg, m.PrefillDone) and msg.src == "target":
                    ttft_ns = msg.recv_ns
                    info["target_prompt_len"] = msg.prompt_len
                    info["target_inputs"] = msg.info
                    actions = state.on_prefill_done(msg.first_token)
                elif isinstance(msg, m.VerifyResult):
                    actions = state.on_verify_result(msg.accepted, msg.next_token)
                elif isinstance(msg, m.DecodeResult):
                    actions = state.on_decode_result(msg.tokens)
                execute(actions, msg.recv_ns)
        except RequestFailed as exc:
            record.update(status="error", error=str(exc))
        if end_ns is None:
            end_ns = time.monotonic_ns()
        stop_roles = [r for r in roles if r == "target" or draft_active]
        for role in stop_roles:
            self.send(m.Stop(request_id=rid, reason="request complete"), role)
        dones = self.collect_done(rid, roles, early_dones)
        record.update(measure_request(state, dones, start_ns, end_ns, ttft_ns, mode))
        record.update(info)
        return record

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
