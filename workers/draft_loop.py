"""The draft worker's request loop: stream drafted tokens as they exist, follow REBASE, stop on STOP.

A mixin of workers.worker.Worker (it uses the worker's backend, spans, send and recv). Executes the pure
state machine coordinator.drafting.DraftState with the engine (whose proposer, workers.proposers, the
worker set for the request); checks its socket between steps; never decides what is verified: the
coordinator does.
"""
from __future__ import annotations

import numpy as np

from coordinator.drafting import DraftState, SendDraft
from protocol import messages as m
from workers.loop_control import HEARTBEAT_S, RequestAborted


class DraftLoop:
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
        """Draft along this worker's own branch, executing a coordinator.drafting.DraftState."""
        if prefill.options.get("stand_aside"):
            # the coordinator let the target run alone: no inputs, no prefill, just answer STOP with DONE
            self.stats["stood_aside"] = str(prefill.options["stand_aside"])
            return
        self.draft_probs: dict[int, np.ndarray] = {}
        self._prefill(prefill)
        engine = self.backend.engine
        self._keep_probs()
        state = DraftState(max_total=prefill.max_new_tokens, max_ahead=prefill.max_ahead, eos_id=self._eos(prefill),
                           batch=max(1, int(prefill.options.get("draft_batch", 1))))
        self._send_draft(state.flush(engine.tokens))
        while True:
            can_step = state.can_step(engine.tokens)
            msg = self.recv(0 if can_step else HEARTBEAT_S * 1000)
            if isinstance(msg, m.Stop):
                self._send_draft(state.flush(engine.tokens))
                self.stats["draft_steps"] = state.steps
                raise RequestAborted()
            if isinstance(msg, m.Shutdown):
                raise RequestAborted(shutdown=True)
            if isinstance(msg, m.Rebase):
                self.proposer.observe(msg.committed)
                todo = state.on_rebase(msg.epoch, msg.committed, msg.max_ahead)
                if todo is not None:
                    with self.span("rebase", committed=len(todo)) as attrs:
                        attrs["forward"] = engine.rebase(todo) is not None    # a rollback (or catching up)
                        if attrs["forward"]:
                            self._keep_probs()
                    self._send_draft(state.flush(engine.tokens))
            elif msg is not None:
                self.send(m.Error(reason=f"{self.name}: unexpected {msg.type!r} while drafting",
                                  in_reply_to=msg.msg_id))
            elif can_step:
                with self.span("draft_step", pos=len(engine.tokens)):
                    engine.step()
                self._keep_probs()
                self._send_draft(state.after_step(engine.tokens))

    def _send_draft(self, send: SendDraft | None) -> None:
        if send is None:
            return
        tokens = self.backend.engine.tokens
        msg = m.Draft(epoch=send.epoch, start_pos=send.start_pos, tokens=tokens[send.start_pos: send.end_pos])
        if self.draft_probs:
            rows = [self.draft_probs.get(p) for p in range(send.start_pos, send.end_pos)]
            if all(r is not None for r in rows):
                msg.arrays["probs"] = np.stack(rows).astype(np.float32)
        self.send(msg)
