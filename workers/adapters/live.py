"""A trained adapter inside the draft's decoding loop, as a `workers.proposers.Proposer`.

The engine calls `propose(prefix, model)` whenever the draft emits the token for answer position
`position = len(prefix)`; `model.out` is that forward pass, `model.row` the output row of `position`, so rows
0..row cover positions position-row .. position (a rebase feeds several tokens, start/step one). The adapter keeps, per
request, what the draft offered at every position (greedy token, hidden state) indexed by position, and
cuts it back whenever an earlier position is emitted again (a rebase after a rejection). It returns its
prediction for `position`, which the engine then feeds to the draft: when the adapter is right the draft's
cache holds the target's tokens, exactly as in teacher-forced collection.

Greedy verification only: `attach` refuses a sampling engine (the adapters were trained to match the
target's greedy answer). Its token is a deterministic function of the prefix, so were it ever asked under
sampling its q would be one-hot, which keeps rejection sampling lossless. Never loads the draft model or
touches sockets.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from workers.proposers import Proposer, one_hot


class LiveAdapter(Proposer):
    """Per-request history + a predictor. `attach(engine)` checks the engine (and makes the adapter its
    proposer); `reset()` per request."""

    def __init__(self, predict: Callable[["LiveAdapter", int], int | None], *, needs_hidden: bool = False,
                 max_len: int | None = None):
        self._predict = predict
        self.needs_hidden = needs_hidden
        self.max_len = max_len
        self.prefix: list[int] = []
        self.reset()

    def reset(self) -> None:
        self.draft_tokens: list[int] = []     # position -> the draft's own greedy token
        self.hidden: list[torch.Tensor] = []  # position -> the draft's last-layer hidden state
        self.calls = 0

    def attach(self, engine) -> "LiveAdapter":
        if getattr(engine, "sampler", None) is not None:
            raise ValueError("draft adapters need greedy verification (temperature 0); the draft engine samples")
        engine.proposer = self
        return self

    def answer_prefix(self, position: int) -> list[int]:
        """The answer tokens before `position` (committed or drafted), as given to the last propose()."""
        return self.prefix[:position]

    def propose(self, prefix: Sequence[int], model) -> tuple[int, object]:
        position, model_token, out, row = len(prefix), int(model.token), model.out, model.row
        self.prefix = list(prefix)
        if position == 0:
            self.reset()                      # a new request (start): nothing earlier can be reused
        first = max(0, position - row)       # rows before answer position 0 (prompt rows) are not kept
        if first > len(self.draft_tokens):
            raise RuntimeError(f"adapter history ends at position {len(self.draft_tokens)} but the draft emitted "
                               f"position {position} from {row + 1} rows: the engine skipped positions")
        if self.needs_hidden and out.hidden is None:
            raise RuntimeError("a hidden adapter needs the draft's hidden states: build the draft's HFStepModel "
                               "with want_hidden=True")
        del self.draft_tokens[first:], self.hidden[first:]
        for i in range(row - (position - first), row + 1):
            self.draft_tokens.append(int(model_token) if i == row else int(out.greedy[i]))
            if self.needs_hidden:
                self.hidden.append(out.hidden[i])
        self.calls += 1
        token = None
        if self.max_len is None or position < self.max_len:
            token = self._predict(self, position)
        token = int(model_token) if token is None else int(token)
        return token, one_hot(token, model.q)


def oracle_adapter(answer: Sequence[int]) -> LiveAdapter:
    """Emits the target's answer by position (benchmarks and the position-convention test); past the answer
    the draft's own token."""
    answer = [int(t) for t in answer]
    return LiveAdapter(lambda live, pos: answer[pos] if pos < len(answer) else None)


def _token_predictor(model, device):
    def predict(live: LiveAdapter, position: int) -> int:
        ids = torch.tensor([live.draft_tokens[: position + 1]], dtype=torch.long, device=device)
        with torch.no_grad():
            return int(model(ids)[0, -1].argmax())
    return predict


def _hidden_predictor(model, device):
    def predict(live: LiveAdapter, position: int) -> int:
        # rounded through float16 as in the collected data, so live and offline see the same inputs
        hidden = torch.stack(live.hidden[: position + 1]).to(device=device, dtype=torch.float16).float()[None]
        prev = torch.tensor([[-1] + live.answer_prefix(position)], dtype=torch.long, device=device)
        with torch.no_grad():
            return int(model(hidden, prev)[0, -1].argmax())
    return predict


def load_live_adapter(ckpt, *, draft_lm=None, device="cpu") -> LiveAdapter:
    """A LiveAdapter for the checkpoint folder `ckpt`. `draft_lm` (workers.models.loading.LoadedModel or
    None) is checked against the adapter: vocabulary and, for the hidden kind, hidden size."""
    from .models import load_adapter

    model = load_adapter(ckpt, device=device)
    cfg = model.cfg
    if draft_lm is not None:
        config = draft_lm.model.config
        if int(config.vocab_size) < cfg.vocab_size:
            raise ValueError(f"{ckpt}: adapter emits ids < {cfg.vocab_size} but the draft's vocabulary has only "
                             f"{config.vocab_size}: it was trained for another draft model")
        if cfg.kind == "hidden" and int(config.hidden_size) != cfg.draft_hidden_size:
            raise ValueError(f"{ckpt}: adapter reads hidden states of size {cfg.draft_hidden_size}, the draft's "
                             f"are {config.hidden_size}: it was trained for another draft model")
    predict = _token_predictor(model, device) if cfg.kind == "token" else _hidden_predictor(model, device)
    live = LiveAdapter(predict, needs_hidden=cfg.kind == "hidden", max_len=cfg.max_len)
    live.model, live.config = model, cfg
    return live
