"""What the EventGPT and Video-LLaVA backends share: precision and device choice, loading real or
synthetic weights, the step model (eager or CUDA-graph), sampling, memory, text, transformers' generate().

Never touches sockets or clocks. Imports torch (only worker processes import this module).
"""
from __future__ import annotations

import gc
import os

import torch

from workers.backends.base import Backend, Prepared, sampling_seed
from workers.engine.core import TokenEngine
from workers.engine.hf import HFStepModel


# fed tokens per forward = drafts + 1: exact buckets for k = 0, 1, 2, 4, 8, 16, 32
VERIFY_BUCKETS = (1, 2, 3, 5, 9, 17, 33)
# cache positions beyond prompt + answer: a verification's drafts and the bonus row, and a draft running
# up to --max-ahead (32) tokens past the committed prefix
CACHE_MARGIN = VERIFY_BUCKETS[-1] + 1 + 32
# typical prompt lengths (DOMAIN.md) and answer length the static cache is first sized for; a request
# that needs more grows it at PREFILL (one re-capture) instead of failing after its decode time is spent
TYPICAL_PROMPT = {"eventgpt": 641, "videollava": 2076}
DEFAULT_ANSWER = 512


def pick_device(requested: str | None) -> str:
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: no CUDA device is visible to this worker; use --device cpu")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_precision(requested: str | None, device: str) -> str:
    if requested:
        return requested
    return "nf4" if device.startswith("cuda") else "fp32"


def kernel_settings(device: str) -> dict:
    """What the exact step's kernels run with on `device`: the EVENTSPEC_* variables set, and whether its
    kernels launch with programmatic dependent launch (`kernels.pdl_on`)."""
    from workers.engine.kernels import env_settings, pdl_on
    pdl = device.startswith("cuda") and torch.cuda.is_available() and pdl_on(torch.device(device))
    return {"kernel_env": env_settings(), "pdl": bool(pdl)}


class HFBackend(Backend):
    kind = ""           # eventgpt | videollava

    def load(self) -> dict:
        opts = self.options
        self.device = pick_device(opts.get("device"))
        if self.device.startswith("cuda"):
            if ":" in self.device:
                torch.cuda.set_device(torch.device(self.device))
            torch.cuda.reset_peak_memory_stats()
        self.precision = pick_precision(opts.get("precision"), self.device)
        if self.device == "cpu":
            # two workers share the machine's cores; oversubscribed BLAS threads slow both down many-fold
            torch.set_num_threads(int(opts.get("threads") or max(1, (os.cpu_count() or 2) // 2)))
        seed = int(opts.get("seed", 0))
        torch.manual_seed(seed)
        if opts.get("synthetic_weights"):
            from workers.models.synthetic import synthetic_model
            size = {"7b": "7b"}.get(opts["synthetic_weights"], opts["synthetic_weights"])
            self.lm = synthetic_model(self.kind, size=size, precision=self.precision, device=self.device, seed=seed)
        else:
            if not opts.get("model"):
                raise ValueError(f"the {self.kind} backend needs a checkpoint folder (--{self.role}-model PATH) "
                                 f"or --synthetic-weights 7b")
            self.lm = self._load_checkpoint(opts["model"])
        self.step_model = self._make_step_model()
        self._load_peak_gpu = None
        if self.device.startswith("cuda"):
            # loading (transformers' from_pretrained, a quantization pass) can peak above what serving
            # needs: report both
            self._load_peak_gpu = int(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        sampler = None
        temperature = float(opts.get("temperature") or 0.0)
        if temperature > 0:
            from workers.engine.sampling import Sampler
            sampler = Sampler(temperature, sampling_seed(seed, self.role))
        self.engine = TokenEngine(self.step_model, sampler)
        self.engine.feed_limit = int(self.lm.model.get_input_embeddings().num_embeddings)
        tok = self.lm.tokenizer
        self.eos_id = int(getattr(tok, "eos_token_id", None) or 2)
        config = self.lm.model.config
        text_config = getattr(config, "text_config", None) or config
        self.vocab_size = int(text_config.vocab_size)
        from workers.models.loading import tokenizer_fingerprint
        checksum = (tokenizer_fingerprint(tok) if hasattr(tok, "convert_ids_to_tokens")
                    else f"stand-in:{tok.vocab_size}")
        n_params = sum(p.numel() for p in self.lm.model.parameters())
        return {"model_id": self.lm.model_id, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "tokenizer_checksum": checksum, "device": self.device, "synthetic": bool(self.lm.synthetic),
                "info": {"precision": self.precision, "dtype": str(self.lm.dtype), "parameters": n_params,
                         "weights": (f"synthetic-{opts['synthetic_weights']}" if self.lm.synthetic
                                     else getattr(self.lm, "weights", "released")),
                         "step_model": type(self.step_model).__name__,
                         "cuda_device": torch.cuda.get_device_name() if self.device.startswith("cuda") else None,
                         "torch": torch.__version__, **kernel_settings(self.device),
                         **({"nf4_scales": self.step_model.nf4_scales}
                            if self.precision == "nf4" and hasattr(self.step_model, "nf4_scales") else {})}}

    def _make_step_model(self, max_cache_len: int | None = None):
        want_hidden = bool(self.options.get("want_hidden"))
        use_graphs = bool(self.options.get("cuda_graphs", True)) and self.device.startswith("cuda")
        if use_graphs:
            from workers.engine.fast import make_step_model
            default = TYPICAL_PROMPT.get(self.kind, 2076) + int(self.options.get("max_new_tokens") or DEFAULT_ANSWER)
            return make_step_model(self.lm.model, device=self.device,
                                   max_cache_len=max_cache_len or int(self.options.get("max_cache_len") or
                                                                      default + CACHE_MARGIN),
                                   cuda_graphs=True, want_hidden=want_hidden, buckets=VERIFY_BUCKETS,
                                   compile=bool(self.options.get("compile", False)),
                                   exact=bool(self.options.get("exact", self._exact_by_default())),
                                   nf4_scales=self._nf4_scales())
        return HFStepModel(self.lm.model, want_hidden=want_hidden)

    def _nf4_scales(self) -> str:
        """The `nf4_scales` option (`ExactStepModel`): "float32" (default) or "bytes"."""
        from workers.engine.exact import ExactStepModel
        value = str(self.options.get("nf4_scales") or "float32")
        if value not in ExactStepModel.NF4_SCALES:
            raise ValueError(f"--{self.role}-option nf4_scales={value}: expected one of "
                             f"{', '.join(ExactStepModel.NF4_SCALES)}")
        return value

    def _exact_by_default(self) -> bool:
        """The target always takes the exact step (lossless verification needs it). A draft's tokens only
        need to be cheap, and the exact step is also the faster one: on an H200 (BENCHMARKS.md) 4.8 vs
        7.0 ms in bf16, and 5.4 vs 6.2 ms in nf4 (its one-row NF4 kernels against bitsandbytes' step).
        Without Triton a draft falls back to the cuBLAS/bitsandbytes step; a target says what is missing."""
        if self.role == "draft":
            from workers.engine.kernels import triton_available
            return triton_available()
        return True

    def prefill(self, prepared: Prepared) -> tuple[int, int]:
        """Grow a static cache too small for prompt + answer + drafts before prefill, not after the
        decode time is spent."""
        capacity = getattr(self.step_model, "max_cache_len", None)
        need = int(prepared.info.get("prompt_len") or 0) + int(prepared.info.get("max_new_tokens") or 0) + CACHE_MARGIN
        if capacity is not None and need > capacity:
            import logging
            logging.getLogger(__name__).warning(
                "static KV cache of %d positions is too small for this request (%d): rebuilding it", capacity, need)
            # the engine holds the old step model too, and a CudaGraphStepModel is in a reference cycle (its
            # `_body`): both must go before empty_cache, or the old cache and graph pool stay on the GPU while
            # the new ones are allocated
            self.step_model = self.engine.model = None
            gc.collect()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            self.step_model = self._make_step_model(max_cache_len=-(-need // 256) * 256)
            self.engine.model = self.step_model
        return super().prefill(prepared)

    # --- per request ---------------------------------------------------------------------------

    def prepare(self, sample: dict, question: str, options: dict) -> Prepared:
        from workers.inputs import load_sample_inputs
        loaded = None
        if sample.get("events") or sample.get("video"):
            loaded = load_sample_inputs(sample, self.role, event_frames=int(options.get("event_frames", 5)),
                                        event_window_ms=options.get("event_window_ms"))
        if self.lm.synthetic:
            from workers.models.synthetic import synthetic_prefill_inputs
            kwargs, prompt_len = synthetic_prefill_inputs(self.lm, question or _reference_question(),
                                                          seed=int(self.options.get("seed", 0)))
            info = dict((loaded or {}).get("info", {}), synthetic_prompt=True)
        else:
            if loaded is None:
                from workers.inputs.errors import InputError
                raise InputError(f"sample {sample.get('sample_id')!r} ({sample.get('path')}): no event or video "
                                 f"input found; the {self.kind} backend needs real inputs")
            kwargs, prompt_len = self._prefill_inputs(loaded, question)
            info = dict(loaded.get("info", {}))
        info["prompt_len"] = prompt_len
        info["max_new_tokens"] = int(options.get("max_new_tokens") or 0)
        return Prepared(prompt=kwargs, info=info)

    def step_bytes(self) -> dict | None:
        from workers.step_bytes import describe_step_bytes
        return describe_step_bytes(self.lm.model, self.step_model)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def memory(self) -> dict:
        mem = super().memory()
        if self.device.startswith("cuda"):
            mem["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())       # since the model was loaded
            mem["gpu_allocated_bytes"] = int(torch.cuda.memory_allocated())
            mem["load_peak_gpu_bytes"] = self._load_peak_gpu
        return mem

    def decode_text(self, token_ids: list[int]) -> str:
        tok = self.lm.tokenizer
        if hasattr(tok, "decode"):
            return tok.decode(token_ids, skip_special_tokens=True)
        return " ".join(str(t) for t in token_ids)

    def hf_generate(self, prepared: Prepared, max_new_tokens: int, eos_id: int) -> list[int]:
        """transformers' own generate(): how users run the target without eventspec."""
        kwargs = dict(prepared.prompt)
        gen_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
        if eos_id < 0:
            gen_kwargs.update(min_new_tokens=max_new_tokens, eos_token_id=None)
        with torch.inference_mode():
            out = self.lm.model.generate(**kwargs, **gen_kwargs)
        n_in = kwargs["input_ids"].shape[1] if "input_ids" in kwargs and out.shape[1] > max_new_tokens else 0
        return [int(t) for t in out[0, n_in:]]

    # --- what each model adds ------------------------------------------------------------------

    def _load_checkpoint(self, path: str):
        raise NotImplementedError

    def _prefill_inputs(self, loaded: dict, question: str):
        raise NotImplementedError


def _reference_question() -> str:
    from workers.models.prompts import REFERENCE_QUESTION
    return REFERENCE_QUESTION


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
