"""The target worker's request loop: after PREFILL, answer VERIFY and DECODE until STOP.

A mixin of workers.worker.Worker (it uses the worker's backend, spans, send and recv). Never decides what
to verify or when: the coordinator does.
"""
from __future__ import annotations

import numpy as np

from protocol import messages as m
from workers.loop_control import HEARTBEAT_S, RequestAborted


class TargetLoop:
    # --- target --------------------------------------------------------------------------

    def _serve_target(self, prefill: m.Prefill) -> None:
        first, prompt_len, info = self._prefill(prefill)
        engine = self.backend.engine
        if prefill.mode != "hf-generate":
            self.answer_ids = engine.tokens          # the engine's list: every verify and step extends it
        self.send(m.PrefillDone(first_token=first, prompt_len=prompt_len, info=info))
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
                    self.answer_ids = self.generated[: 1 + msg.max_tokens]
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

