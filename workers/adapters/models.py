"""Draft-to-target adapters: map what the draft offers at answer position t to the target's token at t.

- `TokenAdapter` ("token"): a small causal transformer over the draft's greedy token ids d_0..d_t; output t
  predicts the target's token t.
- `HiddenAdapter` ("hidden"): EAGLE-style. Input at t is the draft's last-layer hidden state h_t and the
  target's embedding of the token before t (the committed or drafted a_{t-1}; a learned start vector at
  t = 0); a causal transformer maps them to a correction of h_t in the target's hidden space, decoded by the
  target's frozen `lm_head`. Starts as "the draft's hidden state read by the target's head" (the correction
  is zero at init when both hidden sizes agree, as for the two Vicuna-7B models).

Both are causal, so prediction t depends only on inputs 0..t; that is what lets the live adapter
(`live.py`) reproduce offline predictions. Checkpoints: `adapter.safetensors` + `config.json` (no pickle);
the hidden adapter's frozen target tensors live in `target_head.safetensors` beside them. Never reads data
sets or talks to engines.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

KINDS = ("token", "hidden")
WEIGHTS = "adapter.safetensors"
CONFIG = "config.json"
TARGET_HEAD = "target_head.safetensors"


@dataclass
class AdapterConfig:
    kind: str
    vocab_size: int                 # ids the adapter emits (and, for "token", reads): < the draft's vocabulary
    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    ff_mult: int = 4
    max_len: int = 512              # answer positions the adapter covers; later ones fall back to the draft
    dropout: float = 0.1
    draft_hidden_size: int = 0      # "hidden" only
    target_hidden_size: int = 0     # "hidden" only
    extra: dict = field(default_factory=dict)   # provenance: data set, models, training settings

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")

    @classmethod
    def defaults(cls, kind: str, **kw) -> "AdapterConfig":
        """The seed's token adapter shape (512 wide, 4 layers, 8 heads); one EAGLE-like layer for hidden."""
        base = dict(d_model=512, n_layers=4, n_heads=8) if kind == "token" else dict(d_model=1024, n_layers=1,
                                                                                      n_heads=8)
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(kind=kind, **base)


def _causal_stack(cfg: AdapterConfig) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.ff_mult * cfg.d_model, cfg.dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)


def _causal_mask(n: int, device) -> torch.Tensor:
    return torch.triu(torch.full((n, n), float("-inf"), device=device), diagonal=1)


class TokenAdapter(nn.Module):
    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.layers = _causal_stack(cfg)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, draft_tokens: torch.Tensor) -> torch.Tensor:
        """draft_tokens [B, T] (T <= max_len) -> logits [B, T, vocab]."""
        n = draft_tokens.shape[1]
        pos = torch.arange(n, device=draft_tokens.device)
        x = self.embed(draft_tokens.clamp(0, self.cfg.vocab_size - 1)) + self.pos(pos)[None]
        x = self.layers(x, mask=_causal_mask(n, x.device), is_causal=True)
        return self.head(self.norm(x))


class HiddenAdapter(nn.Module):
    """Frozen target tensors are non-persistent buffers: set with `set_target_head`, saved separately."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        hd, ht = cfg.draft_hidden_size, cfg.target_hidden_size
        if hd <= 0 or ht <= 0:
            raise ValueError("a hidden adapter needs draft_hidden_size and target_hidden_size")
        self.in_norm = nn.LayerNorm(hd + ht)
        self.start = nn.Parameter(torch.zeros(ht))        # stands for "no previous token" at t = 0
        self.inp = nn.Linear(hd + ht, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.layers = _causal_stack(cfg)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, ht)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # same space (both models fine-tuned from one LLM): start from the identity; else learn a map
        self.skip = None if hd == ht else nn.Linear(hd, ht, bias=False)
        self.register_buffer("lm_head", torch.zeros(cfg.vocab_size, ht), persistent=False)
        self.register_buffer("target_embed", torch.zeros(cfg.vocab_size, ht), persistent=False)

    def set_target_head(self, lm_head: torch.Tensor, embed: torch.Tensor) -> None:
        v = self.cfg.vocab_size
        if lm_head.shape[0] < v or embed.shape[0] < v:
            raise ValueError(f"target head has {lm_head.shape[0]} rows, the adapter needs {v}")
        dtype = self.lm_head.dtype
        self.lm_head = lm_head[:v].detach().to(device=self.lm_head.device, dtype=dtype).contiguous()
        self.target_embed = embed[:v].detach().to(device=self.lm_head.device, dtype=dtype).contiguous()

    def forward(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, Hd]; prev_tokens [B, T] (the token before each position, -1 at t = 0) ->
        logits [B, T, vocab]."""
        n = hidden.shape[1]
        hidden = hidden.float()
        emb = F.embedding(prev_tokens.clamp(0, self.cfg.vocab_size - 1), self.target_embed).float()
        emb = torch.where((prev_tokens < 0)[..., None], self.start.expand_as(emb), emb)
        x = self.inp(self.in_norm(torch.cat([hidden, emb], dim=-1)))
        x = x + self.pos(torch.arange(n, device=x.device))[None]
        x = self.layers(x, mask=_causal_mask(n, x.device), is_causal=True)
        base = hidden if self.skip is None else self.skip(hidden)
        mapped = base + self.out(self.norm(x))
        return (mapped.to(self.lm_head.dtype) @ self.lm_head.T).float()


def build_adapter(cfg: AdapterConfig) -> nn.Module:
    return TokenAdapter(cfg) if cfg.kind == "token" else HiddenAdapter(cfg)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_adapter(model: nn.Module, folder, *, target_head: Path | None = None) -> None:
    """Weights (safetensors), config (JSON) and, for "hidden", a copy of the frozen target tensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(asdict(model.cfg), indent=1))
    if model.cfg.kind == "hidden" and target_head is not None and Path(target_head).resolve() != (
            folder / TARGET_HEAD).resolve():
        import shutil
        shutil.copyfile(target_head, folder / TARGET_HEAD)


def read_adapter_config(folder) -> AdapterConfig:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not an adapter checkpoint (no {CONFIG}); train one with "
                                "`coordinator adapter train --out DIR`")
    return AdapterConfig(**json.loads(path.read_text()))


def load_target_head(path, device="cpu", dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(path), device=str(device))
    lm_head, embed = tensors["lm_head"], tensors["embed_tokens"]
    if dtype is not None:
        lm_head, embed = lm_head.to(dtype), embed.to(dtype)
    return lm_head, embed


def load_adapter(folder, *, device="cpu") -> nn.Module:
    """An adapter in eval mode on `device`; the hidden kind gets its frozen target head too."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = read_adapter_config(folder)
    model = build_adapter(cfg)
    model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    model.to(device)
    if cfg.kind == "hidden":
        head = folder / TARGET_HEAD
        if not head.is_file():
            raise FileNotFoundError(f"{head}: a hidden adapter needs the target's lm_head and embedding beside "
                                    "its weights; re-run `coordinator adapter train`")
        model.set_target_head(*load_target_head(head, device))
    return model.eval()
