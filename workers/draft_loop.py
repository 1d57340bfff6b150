"""The draft worker's request loop: stream drafted tokens as they exist, follow REBASE, stop on STOP.

A mixin of workers.worker.Worker (it uses the worker's backend, spans, send and recv). Checks its socket
between steps; never decides what is verified: the coordinator does.
"""
from __future__ import annotations

import numpy as np

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
