"""EventGPT as a transformers model: config (`model_type: "EventChat_llama"`), module tree and Auto registration.

The module names reproduce the released checkpoint's state-dict names (model.embed_tokens, model.layers.*,
model.visual_projector.{0,2}, model.feature_adaptor, model.visual_tower.visual_tower.vision_model.*), so
`from_pretrained` reads the released folder as is. The language model is transformers' LlamaModel (decode
steps are plain LLaMA calls); the event tower is transformers' CLIPVisionModel.
This module never reads files or resolves paths: eventgpt_loading.py does.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationMixin,
    LlamaConfig,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

from .prompts import EVENT_PLACEHOLDER_ID, splice_event_embeddings

MODEL_TYPE = "EventChat_llama"

# openai/clip-vit-large-patch14-336, used when neither the config nor a CLIP folder says otherwise.
CLIP_VIT_L14_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


@strict
class EventGPTConfig(LlamaConfig):
    """LLaMA fields plus the released EventGPT multimodal fields.

    `vision_config` is not in the released config.json: the loader fills it from the CLIP folder named by
    `mm_visual_tower` so the tower can be built before any weight is read.
    """

    model_type = MODEL_TYPE

    mm_visual_tower: str | None = "openai/clip-vit-large-patch14-336"
    mm_hidden_size: int = 1024
    event_feature_adaptor: bool | None = None
    use_event_qformer: bool | None = False
    mm_use_im_start_end: bool | None = False
    mm_use_im_patch_token: bool | None = False
    vision_config: dict | None = None

    def __post_init__(self, **kwargs):
        if self.use_event_qformer:
            raise ValueError(
                "EventGPT config sets use_event_qformer: true; that path of the released code is broken upstream "
                "and is not supported here. Use a checkpoint whose config.json has use_event_qformer false."
            )
        super().__post_init__(**kwargs)

    def clip_vision_config(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(**(self.vision_config or CLIP_VIT_L14_336))


class _CLIPHolder(nn.Module):
    def __init__(self, vision_config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(vision_config)


class EventVisualTower(nn.Module):
    """Two wrapper levels reproduce the released names `visual_tower.visual_tower.vision_model.*`
    (transformers 5.x's CLIPVisionModel itself has no `vision_model` level any more)."""

    def __init__(self, vision_config: CLIPVisionConfig):
        super().__init__()
        self.visual_tower = _CLIPHolder(vision_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # CLIP's last_hidden_state is the final encoder layer's output, before post_layernorm
        # (which CLIP applies to the pooled CLS token only); all tokens, CLS included, are kept.
        return self.visual_tower.vision_model(pixel_values=pixel_values).last_hidden_state


class EventGPTModel(LlamaModel):
    config: EventGPTConfig
    config_class = EventGPTConfig
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]

    def __init__(self, config: EventGPTConfig):
        super().__init__(config)
        vision_config = config.clip_vision_config()
        if vision_config.hidden_size != config.mm_hidden_size:
            raise ValueError(
                f"EventGPT config mm_hidden_size={config.mm_hidden_size} but the CLIP tower's hidden_size is "
                f"{vision_config.hidden_size}: point mm_visual_tower (or clip_path) at the CLIP model the checkpoint was trained with"
            )
        self.visual_tower = EventVisualTower(vision_config)
        self.visual_projector = nn.Sequential(
            nn.Linear(config.mm_hidden_size, config.hidden_size),
            nn.GELU(),
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        if config.event_feature_adaptor:
            self.feature_adaptor = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def encode_events(self, event_pixel_values: torch.Tensor) -> torch.Tensor:
        """Event images [t, 3, S, S] → embeddings [t + N, hidden], N = CLIP tokens per image (577 at 336 px)."""
        proj_dtype = self.visual_projector[0].weight.dtype
        tower_param = next(self.visual_tower.parameters())
        feats = self.visual_tower(event_pixel_values.to(device=tower_param.device, dtype=tower_param.dtype))
        feats = self.visual_projector(feats.to(proj_dtype))
        if getattr(self, "feature_adaptor", None) is not None:
            feats = self.feature_adaptor(feats)
        # [t, N, H] → cat(mean over tokens [t, H], mean over frames [N, H])
        return torch.cat([feats.mean(dim=1), feats.mean(dim=0)], dim=0)


class EventGPTForCausalLM(LlamaPreTrainedModel, GenerationMixin):
    config: EventGPTConfig
    config_class = EventGPTConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]

    def __init__(self, config: EventGPTConfig):
        super().__init__(config)
        self.model = EventGPTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        event_pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """A LLaMA causal-LM forward; on prefill `input_ids` may hold one EVENT_PLACEHOLDER_ID, which is replaced
        by the embeddings of `event_pixel_values` (so the CLIP tower's time counts as prefill time)."""
        has_placeholder = input_ids is not None and bool((input_ids == EVENT_PLACEHOLDER_ID).any())
        if has_placeholder:
            if event_pixel_values is None:
                raise ValueError("input_ids hold the event placeholder -200 but no event_pixel_values were given")
            event_embeds = self.model.encode_events(event_pixel_values)
            inputs_embeds = splice_event_embeddings(self.model.embed_tokens, input_ids, event_embeds)
            input_ids = None
            if attention_mask is not None:
                # The splice changes the length; a batch of one has no padding, so every position attends.
                if not bool(attention_mask.all()):
                    raise ValueError("padding is not supported together with the event splice (batch size 1 only)")
                attention_mask = None
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know "EventChat_llama" (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, EventGPTConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(EventGPTConfig, EventGPTForCausalLM)
    except ValueError:
        pass


register()
