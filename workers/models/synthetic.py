"""Randomly initialised models of the real architectures, for timing runs without released weights.

Owns: building EventGPT-7B / Video-LLaVA-7B (or a tiny geometry for CPU tests) on the meta device and
materialising them directly on the target device (no CPU copy of 7B weights), optional NF4 quantization,
a stand-in tokenizer, and prefill inputs of the real prompt lengths. Everything it returns is labelled
`synthetic=True`: its outputs are meaningless text, only its shapes and costs are real.
Never reads checkpoints.

The stand-in tokenizer: there is no real LLaMA tokenizer offline, so `StandInTokenizer` cuts text into
SentencePiece-like pieces (a leading '▁' marks a space; words, single punctuation marks and '\n' are
pieces) and splits the three template words `USER`, `ASSISTANT` and `curious` into 2, 4 and 2 pieces.
Those three splits are assumptions, chosen so that the template reproduces the lengths DOMAIN.md reports
for the real tokenizer: EventGPT 39 + 20 = 59 text tokens for the reference question (641 with 5 event
images, 637 with 1) and Video-LLaVA 20 text tokens (2,076 with 8 × 257 video tokens). Ids are stable
hashes of the pieces into [3, 32000); they carry no meaning.
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import nn

from .checkpoint import EVENTGPT_SKIP_MODULES, VIDEOLLAVA_SKIP_MODULES, LoadedModel, check_precision
from .eventgpt import CLIP_VIT_L14_336, EventGPTConfig, EventGPTForCausalLM
from .prompts import REFERENCE_QUESTION, eventgpt_prompt_ids, spliced_length
from .videollava_loading import videollava_prompt_ids

SIZES = ("7b", "tiny-test")
N_EVENT_IMAGES = 5
N_VIDEO_FRAMES = 8


class StandInTokenizer:
    """Counts pieces like the Vicuna SentencePiece tokenizer does for the prompt templates (see module doc)."""

    bos_token_id = 1
    eos_token_id = 2
    unk_token_id = 0
    _SPLITS = {"▁USER": 2, "▁ASSISTANT": 4, "▁curious": 2}
    _PIECE = re.compile(r"▁?[A-Za-z0-9]+|▁?[^A-Za-z0-9▁\n]|\n|▁")

    def __init__(self, vocab_size: int = 32000, added_tokens: dict[str, int] | None = None):
        self.vocab_size = vocab_size
        self.added_tokens = dict(added_tokens or {})

    def __len__(self) -> int:
        return self.vocab_size + len(self.added_tokens)

    def _piece_id(self, piece: str) -> int:
        digest = hashlib.sha256(piece.encode("utf-8")).digest()
        return 3 + int.from_bytes(digest[:8], "little") % (self.vocab_size - 3)

    def _pieces(self, text: str, first: bool) -> list[str]:
        text = text.replace(" ", "▁")
        if first:
            text = "▁" + text  # SentencePiece's dummy prefix
        pieces = []
        for piece in self._PIECE.findall(text):
            n = self._SPLITS.get(piece, 1)
            pieces.extend([piece] if n == 1 else [f"{piece}#{i}" for i in range(n)])
        return pieces

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens else []
        if self.added_tokens:
            pattern = "(" + "|".join(re.escape(t) for t in self.added_tokens) + ")"
            parts = [p for p in re.split(pattern, text) if p]
        else:
            parts = [text]
        first = True
        for part in parts:
            if part in self.added_tokens:
                ids.append(self.added_tokens[part])
            else:
                ids.extend(self._piece_id(p) for p in self._pieces(part, first))
            first = False
        return ids

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.added_tokens.get(token, self.unk_token_id)

    def convert_ids_to_tokens(self, ids):
        return [f"<standin:{i}>" for i in ids]

    def decode(self, ids, **_) -> str:
        return " ".join(f"<{int(i)}>" for i in ids)


def _eventgpt_config(size: str) -> EventGPTConfig:
    if size == "7b":
        return EventGPTConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
            mm_hidden_size=1024, event_feature_adaptor=True, vision_config=dict(CLIP_VIT_L14_336),
        )
    return EventGPTConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=4096, mm_hidden_size=32, event_feature_adaptor=True,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14, projection_dim=16, hidden_act="quick_gelu"),
    )


def _videollava_config(size: str):
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig

    if size == "7b":
        text = LlamaConfig(
            vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        )
        # LanguageBind's towers are CLIP ViT-L/14 at 224 px: 16×16 + 1 = 257 tokens per frame.
        vision = CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=224, patch_size=14, projection_dim=768, hidden_act="gelu",
        )
    else:
        text = LlamaConfig(
            vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=4096,
        )
        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=56, patch_size=14, projection_dim=16,
        )
    return VideoLlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000, video_token_index=32001
    )


def _materialize(model_cls, config, dtype: torch.dtype, device: str, seed: int, *,
                 quantize_linear=None, skip_modules: list[str] = ()) -> nn.Module:
    """Build `model_cls(config)` on the meta device and materialise it on `device` with seeded random weights.

    With `quantize_linear` (NF4), the linears outside `skip_modules` are never all in `dtype` at once:
    they are taken out of the model, the rest is materialised and initialised, then each of them in turn is
    materialised, initialised, handed to `quantize_linear` and dropped before the next one, so the loading
    peak is the quantized model plus one linear in `dtype`. The random values then differ from the
    unquantized model of the same seed (the generator is drawn in another order), their distributions do not.
    """
    with torch.device("meta"):
        model = model_cls(config)
    for p in model.parameters():  # on meta this costs nothing; buffers (RoPE, position ids) stay as built
        p.data = p.data.to(dtype)
    pending = _take_out_linears(model, skip_modules) if quantize_linear is not None else []
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.initialize_weights()  # fills parameters and recomputes the RoPE / position-id buffers on `device`
    pending.reverse()  # pop() below then goes in module order
    while pending:
        owner, parent, name, linear = pending.pop()  # popped: no list keeps the materialised weight alive
        linear.to_empty(device=device)
        with torch.no_grad():
            owner._init_weights(linear)  # what initialize_weights does for it: normal(0, initializer_range)
        setattr(parent, name, quantize_linear(linear))
        del linear
    return model


def _take_out_linears(model: nn.Module, skip_modules) -> list[tuple]:
    """Replace every nn.Linear outside `skip_modules` by an nn.Identity placeholder (so that materialising
    the model leaves them on meta); returns (owning PreTrainedModel, parent, attribute name, the linear) for
    each, in module order."""
    from transformers import PreTrainedModel

    owners = {name: m for name, m in model.named_modules() if isinstance(m, PreTrainedModel)}
    taken = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if not isinstance(child, nn.Linear) or any(full == s or full.startswith(s + ".") for s in skip_modules):
                continue
            # the nearest enclosing PreTrainedModel initialises it (LlamaModel inside the multimodal wrappers)
            owner = max((o for o in owners if o == "" or full.startswith(o + ".")), key=len)
            taken.append((owners[owner], parent, name, child))
            setattr(parent, name, nn.Identity())
    return taken


def nf4_linear(linear: nn.Linear) -> nn.Module:
    """A bitsandbytes NF4 Linear4bit (double quant, bf16 compute: the reference 4-bit setting) holding
    `linear`'s weight, quantized where it lies (CUDA)."""
    import bitsandbytes as bnb

    device = linear.weight.device
    q = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4", device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        linear.weight.data.to(torch.bfloat16), requires_grad=False, compress_statistics=True, quant_type="nf4"
    ).to(device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(torch.bfloat16), requires_grad=False)
    return q


def synthetic_model(kind: str, *, size: str = "7b", precision: str = "bf16", device: str = "cpu", seed: int = 0) -> LoadedModel:
    """A random-weight model of the real architecture; under nf4 it is quantized linear by linear while it is
    built (see `_materialize`), never held whole in bf16."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}; got {size!r}")
    dtype = check_precision(precision, device)
    if kind == "eventgpt":
        model_cls, config, skip = EventGPTForCausalLM, _eventgpt_config(size), EVENTGPT_SKIP_MODULES
        tokenizer = StandInTokenizer()
    elif kind == "videollava":
        from transformers import VideoLlavaForConditionalGeneration

        model_cls, config, skip = VideoLlavaForConditionalGeneration, _videollava_config(size), VIDEOLLAVA_SKIP_MODULES
        tokenizer = StandInTokenizer(added_tokens={"<image>": 32000, "<video>": 32001})
    else:
        raise ValueError(f"kind must be 'eventgpt' or 'videollava'; got {kind!r}")
    quantize = nf4_linear if precision == "nf4" else None
    model = _materialize(model_cls, config, dtype, device, seed, quantize_linear=quantize, skip_modules=skip)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(
        model=model, tokenizer=tokenizer, kind=kind, model_id=f"synthetic:{kind}-{size}", device=str(device),
        dtype=dtype, synthetic=True, image_processor=None,
    )


def synthetic_prefill_inputs(lm: LoadedModel, question: str = REFERENCE_QUESTION, *, seed: int = 0) -> tuple[dict, int]:
    """Prefill kwargs of the real prompt lengths (random pixels), in the same form as the loaders'."""
    gen = torch.Generator().manual_seed(seed)
    config = lm.model.config
    if lm.kind == "eventgpt":
        vision = config.clip_vision_config()
        pixels = torch.randn(N_EVENT_IMAGES, 3, vision.image_size, vision.image_size, generator=gen)
        ids = eventgpt_prompt_ids(lm.tokenizer, question)
        n_event = N_EVENT_IMAGES + (vision.image_size // vision.patch_size) ** 2 + 1
        kwargs = {
            "input_ids": torch.tensor([ids], dtype=torch.long, device=lm.device),
            "event_pixel_values": pixels.to(device=lm.device, dtype=lm.dtype),
        }
        return kwargs, spliced_length(ids, n_event)
    size = config.vision_config.image_size
    pixels = torch.randn(1, N_VIDEO_FRAMES, 3, size, size, generator=gen)
    ids = videollava_prompt_ids(lm.tokenizer, config, question, N_VIDEO_FRAMES).to(lm.device)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": pixels.to(device=lm.device, dtype=lm.dtype),
    }
    return kwargs, ids.shape[1]
