"""Autoregressive generation: build a cached decoder, export it, decode token by token.

    gen = Generator("path/to/checkpoint")                 # or a registered name, file.py:factory
    result = gen.generate(["Hello", "A longer prompt"], max_new_tokens=20)
    result.ids, result.text, result.tokens_per_s, result.provider

The model is traced with `use_cache=true` (an encoder-decoder as two graphs, `part=encoder`
and `part=decoder`; the encoder runs once per batch and also returns each decoder layer's
cross-attention keys/values, which every decoder step reads as they are: no step re-projects
the encoder states), optimised (-O3 by default), exported to ONNX in memory and run by
`tgraph.runtime.Session`. Every family with a `kv_cache` option uses the static KV cache
(`kv_cache="static"`, see `tgraph.dsl.cache`), run by `tgraph.runtime.static_cache.StaticDecoder`
on fixed buffers (an encoder-decoder's cross-attention K/V bound once per request);
`kv_cache="dynamic"` keeps the Concat cache on the session's device (`DeviceKVCache`). Only the
last position's logits come to the host, where `tgraph.sampling` picks the next tokens.

Batches follow Hugging Face's `generate`, so greedy decoding gives its ids token for token:
decoder-only prompts are left-padded with position_ids = cumsum(mask) - 1 (the static cache
right-aligns rows instead, which gives the same positions and attention); an encoder's input
is right-padded; a row that emitted an EOS id keeps emitting the pad id (not returned in `ids`,
kept in `tokens`); decoding stops when every row has finished or after `max_new_tokens`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from .errors import ConfigError, InputError, ShapeError
from .numerics import warn_nonfinite
from .sampling import SamplingConfig, next_tokens
from .tokens import (UNSET, SpecialTokens, TextTokenizer, check_ids, checkpoint_special_ids, find_tokenizer,
                     normalise_prompts, pad_batch, position_ids, resolve_special_tokens)

DEFAULT_GENERATE_LEVEL = 3
POSITION_LIMITS = ("n_positions", "max_position_embeddings", "max_len")   # learned/sinusoidal tables
GENERATION_KEYS = ("use_cache", "part", "kv_cache", "cache_length")
BUFFER_QUANTUM = 256        # static buffers grow in steps of this many positions
ENCODER_OUTPUTS = {"last_hidden_state": "encoder_hidden_states"}   # encoder output -> decoder input
CROSS_PREFIX = "cross_attention."     # cached cross-attention K/V (`tgraph.dsl.cache.CROSS`)


@dataclass
class Step:
    """One decoding step: the token of every row (pad where the row had already finished)."""

    index: int
    tokens: np.ndarray          # int64 [batch]
    active: np.ndarray          # bool [batch]: the row emitted a real token (it had not finished)


@dataclass
class GenerationResult:
    ids: List[List[int]]        # new tokens per row, up to and including its EOS
    tokens: np.ndarray          # int64 [batch, steps]: new tokens, pad after a row's EOS (HF's layout)
    text: Optional[List[str]]   # decoded ids per row, when there is a tokenizer
    tokens_per_s: float         # new tokens (all rows) per second of prefill + decoding
    seconds: float
    prefill_seconds: float
    provider: str               # what the session really ran on

    def as_json(self) -> list:
        """One {"ids", "text", "tokens_per_s"} object per row."""
        return [{"ids": ids, "text": None if self.text is None else self.text[i],
                 "tokens_per_s": round(self.tokens_per_s, 3)} for i, ids in enumerate(self.ids)]


def _config_class(model: str):
    """The config dataclass behind MODEL without building it, or None for file.py:factory."""
    from .models import get_family

    if os.path.isdir(model):
        from .checkpoints import read_config
        from .sources import adapter_for

        return get_family(adapter_for(read_config(Path(model)), Path(model)).family).config_cls
    head, sep, _ = model.rpartition(":")
    if sep and head.endswith(".py"):
        return None
    from .sources import refuse_missing_path

    refuse_missing_path(model)          # the same words as `export` for a path that is not there
    return get_family(model).config_cls


def _fields(config_or_cls) -> set:
    return {f.name for f in dataclasses.fields(config_or_cls)} if dataclasses.is_dataclass(config_or_cls) else set()


@dataclass(frozen=True)
class ForcedTokens:
    """Hugging Face's `forced_bos_token_id` / `forced_eos_token_id` (BART's configs set
    forced_eos 2): an encoder-decoder's first new token is the forced bos, the last one allowed
    by max_new_tokens a forced eos, as `generate`'s ForcedBOS/EOSTokenLogitsProcessor make them."""

    bos: Optional[int] = None
    eos: tuple = ()

    @classmethod
    def of_checkpoint(cls, directory: str, encoder_decoder: bool) -> "ForcedTokens":
        from .checkpoints import checkpoint_file, read_json_file
        from .tokens import _ids_of

        found: dict = {}
        for name in ("config.json", "generation_config.json"):      # generation_config wins
            path = checkpoint_file(Path(directory), name)
            data = read_json_file(path) if path.is_file() else None
            if isinstance(data, dict):
                found.update({k: data[k] for k in ("forced_bos_token_id", "forced_eos_token_id") if k in data})
        bos = _ids_of(found.get("forced_bos_token_id"), "forced_bos_token_id", f"{directory}: checkpoint config")
        eos = _ids_of(found.get("forced_eos_token_id"), "forced_eos_token_id", f"{directory}: checkpoint config")
        return cls(bos=bos[0] if bos and encoder_decoder else None, eos=eos)

    def apply(self, logits: np.ndarray, step: int, max_new_tokens: int) -> np.ndarray:
        """logits [batch, vocab] with everything but the forced token(s) at -inf at their step."""
        forced = (self.bos,) if step == 0 and self.bos is not None else \
            self.eos if step == max_new_tokens - 1 else ()
        if not forced:
            return logits
        if max(forced) >= logits.shape[-1]:
            raise ConfigError(f"forced token id {max(forced)} is outside the vocabulary ({logits.shape[-1]} ids)")
        out = np.full_like(logits, -np.inf)
        out[:, list(forced)] = 0.0
        return out


class Generator:
    """A model ready to generate: its cached decoder (and encoder) sessions and special ids.

    `model` is a registered name, a checkpoint directory, file.py:factory, or a generation
    directory (`tgraph export MODEL --task generate -o DIR`), which is only read: no tracing,
    its graph, config and special ids as exported (`overrides`, `level`, `dtype`, `seed`,
    `kv_cache` and `max_length` are then fixed by the directory). `overrides` are
    config fields (as `--set`); `seed` initialises random weights. Special ids not given here
    come from the checkpoint's configs (see `tgraph.tokens.resolve_special_tokens`);
    `bos_token_id`, when given, is prepended to decoder-only prompts and starts an
    encoder-decoder's output. `tokenizer`: a tokenizer.json path (default: the checkpoint's).
    `kv_cache`: "auto" (the default: static where the family and the model's shapes allow it,
    else dynamic, saying why in `cache_note`), "static" or "dynamic"; `max_length`: the
    static cache's capacity in positions (default: the model's, capped at 4096).
    """

    def __init__(self, model: str, *, overrides: Optional[Mapping[str, str]] = None, level: int = DEFAULT_GENERATE_LEVEL,
                 provider: Union[str, Sequence[str]] = "auto", threads: Optional[int] = None, seed: int = 0,
                 dtype: str = "float32", tokenizer: Any = UNSET, eos_token_id: Any = UNSET,
                 pad_token_id: Any = UNSET, bos_token_id: Any = UNSET, decoder_start_token_id: Any = UNSET,
                 kv_cache: str = "auto", max_length: Optional[int] = None):
        from .api import build
        from .codegen.onnx import to_onnx
        from .runtime import Session
        from .sources import load_model

        overrides = dict(overrides or {})
        clash = [k for k in GENERATION_KEYS if k in overrides]
        if clash:
            raise ConfigError(f"--set {clash[0]}: generation sets it itself (use_cache=true, and part= for "
                              "encoder-decoders)")
        start = time.perf_counter()
        from .export_dir import is_generation_dir

        if is_generation_dir(model):
            if overrides or dtype != "float32" or max_length is not None:
                raise ConfigError(f"{model}: a generation directory is fixed when exported (--set, --dtype and "
                                  "--max-length go to `tgraph export --task generate`)")
            self._init_from_dir(model, provider, threads, start, tokenizer, eos_token_id, pad_token_id,
                                bos_token_id, decoder_start_token_id)
            return
        cls = _config_class(model)
        if cls is not None and "use_cache" not in _fields(cls):
            raise ConfigError(f"{model}: {cls.__name__} has no KV-cache decoder, so it cannot generate "
                              "(generation needs a decoder: gpt, gpt2, llama, palm, t5, bart, transformer)")
        self.encoder_decoder = cls is not None and "part" in _fields(cls)
        if kv_cache not in ("auto", "static", "dynamic"):
            raise ConfigError(f"kv_cache must be 'auto', 'static' or 'dynamic', got {kv_cache!r}")
        static = kv_cache != "dynamic" and cls is not None and "kv_cache" in _fields(cls)
        cache_sets = {"kv_cache": "static", **({"cache_length": str(int(max_length))} if max_length else {})} \
            if static else {}
        decoder = load_model(model, {**overrides, "use_cache": "true", **cache_sets,
                                     **({"part": "decoder"} if self.encoder_decoder else {})})
        if cls is None and "part" in _fields(decoder.config):     # a factory's encoder-decoder
            self.encoder_decoder = True
            decoder = load_model(model, {**overrides, "use_cache": "true", "part": "decoder"})
        built = {}
        self.cache_note = None          # why "auto" fell back to the dynamic cache, if it did
        if static:
            try:
                from .export_dir import generation_pipeline

                target = "cuda" if provider == "cuda" else "cpu"     # the CPU's passes also suit CUDA's kernels
                built["decoder"] = build(decoder, seed=seed, pipeline=generation_pipeline(level, target, dtype),
                                         dtype=dtype).graph
            except ShapeError as e:     # e.g. a head size GroupQueryAttention's kernels do not take
                if kv_cache != "auto" or not str(e).startswith("GroupQueryAttention"):
                    raise
                self.cache_note = f"dynamic KV cache: the static one cannot hold this model ({e})"
                decoder = load_model(model, {**overrides, "use_cache": "true",
                                             **({"part": "decoder"} if self.encoder_decoder else {})})
        self.config = decoder.config
        self.static = getattr(self.config, "kv_cache", "dynamic") == "static"
        self.vocab_size = decoder.vocab_size
        sessions = {"decoder": decoder}
        if self.encoder_decoder:          # loaded below, once the decoder's inputs are known
            sessions["encoder"] = None
        self.sessions = {}
        for part, loaded in sessions.items():
            if part == "encoder":         # use_cache: it also returns the cross-attention K/V the decoder reads
                cross = any(n.startswith(CROSS_PREFIX) for n in self.sessions["decoder"].input_names)
                loaded = load_model(model, {**overrides, "part": "encoder", **({"use_cache": "true"} if cross else {})})
            graph = built.get(part) or build(loaded, seed=seed, level=level, dtype=dtype).graph
            if self.static and part == "decoder":
                from .export_dir import logits_to_float32

                logits_to_float32(graph)                       # sampling reads fp32, also for fp16/bf16
                self.sessions[part] = self._static_session(to_onnx(graph).SerializeToString(), provider, threads)
            else:
                self.sessions[part] = Session(to_onnx(graph), providers=provider, threads=threads)
        self.decoder = self.sessions["decoder"]
        self.encoder = self.sessions.get("encoder")
        if "logits" not in self.decoder.output_names:
            raise ConfigError(f"{model}: the decoder has no `logits` output (a model without an LM head "
                              "cannot generate)")
        self.provider = self.decoder.describe()
        self.build_seconds = time.perf_counter() - start
        self._finish_init(model, tokenizer, eos_token_id, pad_token_id, bos_token_id, decoder_start_token_id)

    def _init_from_dir(self, path, provider, threads, start, tokenizer, eos_token_id, pad_token_id, bos_token_id,
                       decoder_start_token_id):
        """Read a generation directory: its manifest, its sessions (an encoder-decoder's
        encoder too); nothing is traced."""
        from types import SimpleNamespace

        from .export_dir import read_manifest
        from .runtime import Session

        manifest = read_manifest(path)
        self.manifest = manifest
        self.encoder_decoder = manifest.get("encoder_file") is not None
        self.config = SimpleNamespace(**manifest["config"])
        self.static = True
        self.cache_note = None
        self.decoder = self._static_session(str(Path(path) / manifest["model_file"]), provider, threads)
        self.encoder = Session(str(Path(path) / manifest["encoder_file"]), providers=provider, threads=threads) \
            if self.encoder_decoder else None
        self.sessions = {"decoder": self.decoder, **({"encoder": self.encoder} if self.encoder else {})}
        self.vocab_size = self.decoder.outputs[[s.name for s in self.decoder.outputs].index("logits")].shape[-1]
        self.provider = self.decoder.describe()
        self.build_seconds = time.perf_counter() - start
        saved = manifest.get("special_ids", {})
        exported = {"eos_token_id": saved.get("eos") or None, "pad_token_id": saved.get("pad"),
                    "bos_token_id": saved.get("bos"), "decoder_start_token_id": saved.get("decoder_start")}
        if exported["decoder_start_token_id"] is None and bos_token_id is UNSET:    # else the given bos starts
            exported["decoder_start_token_id"] = saved.get("decoder_start_default")
        given = {k: v for k, v in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id),
                                   ("bos_token_id", bos_token_id), ("decoder_start_token_id", decoder_start_token_id))}
        for key, value in exported.items():           # the export's ids unless given here
            if given[key] is UNSET and value is not None:
                given[key] = value
        self.special = resolve_special_tokens(given, {}, None)
        self.forced = ForcedTokens(bos=saved.get("forced_bos"), eos=tuple(saved.get("forced_eos") or ()))
        self.tokenizer = find_tokenizer(str(path)) if tokenizer is UNSET else (
            tokenizer if tokenizer is None or isinstance(tokenizer, TextTokenizer) else TextTokenizer(tokenizer))
        self.model = str(path)
        self.max_length = int(manifest["max_length"])
        self._static_decoder = None

    def _static_session(self, source, provider, threads):
        """The static decoder's session; on CUDA re-created with CUDA graphs when the graph
        qualifies (`tgraph.runtime.static_cache.cuda_graph_plan`, kept in `cuda_graph_plan`)."""
        from .runtime import Session
        from .runtime.static_cache import (RECORD_PLACEMENT, cuda_graph_options, cuda_graph_plan, node_providers,
                                           request_inputs, static_signature)

        session = Session(source, providers=provider, threads=threads, session_config=RECORD_PLACEMENT)
        plan = cuda_graph_plan(session.device, static_signature(session.inputs, session.outputs),
                               node_providers(session.ort_session), per_request=request_inputs(session.input_names))
        if plan.enable:
            session = Session(source, providers=provider, threads=threads, cuda_options=cuda_graph_options(plan))
        self.cuda_graph_plan = plan
        return session

    def _finish_init(self, model, tokenizer, eos_token_id, pad_token_id, bos_token_id, decoder_start_token_id):
        from .models.decoding import cache_length

        self.max_length = cache_length(self.config, self._position_limit()) if self.static else None
        self._static_decoder = None
        given = {"eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "bos_token_id": bos_token_id,
                 "decoder_start_token_id": decoder_start_token_id}
        checkpoint = checkpoint_special_ids(model) if os.path.isdir(model) else {}
        self.special: SpecialTokens = resolve_special_tokens(given, checkpoint, self.config)
        self.forced = ForcedTokens.of_checkpoint(model, self.encoder_decoder) if os.path.isdir(model) \
            else ForcedTokens()
        if tokenizer is UNSET:
            self.tokenizer = find_tokenizer(model)
        else:
            self.tokenizer = tokenizer if tokenizer is None or isinstance(tokenizer, TextTokenizer) \
                else TextTokenizer(tokenizer)
        self.model = model

    # ------------------------------------------------------------------ helpers
    def _position_limit(self) -> Optional[int]:
        return next((int(getattr(self.config, k)) for k in POSITION_LIMITS if hasattr(self.config, k)), None)

    def static_decoder(self, batch: int, positions: int):
        """The fixed-buffer runner for `batch` rows and at least `positions` positions, reused
        across requests while it fits (same buffers, same addresses)."""
        from .runtime.static_cache import StaticDecoder

        current = self._static_decoder
        if current is None or current.batch != batch or current.max_length < positions:
            size = min(self.max_length, -(-positions // BUFFER_QUANTUM) * BUFFER_QUANTUM)
            self._static_decoder = current = StaticDecoder(self.decoder, batch, size,
                                                           cuda_graph=self.cuda_graph_plan.enable)
        return current

    def _check_length(self, positions_needed: int, what: str) -> None:
        limit = self._position_limit()
        if limit is not None and positions_needed > limit:
            raise InputError(f"{what} needs {positions_needed} positions but the model has {limit}; "
                             "shorten the prompt or lower max_new_tokens")

    def _on_device(self, session, array: np.ndarray):
        """A static input (encoder states, masks) uploaded once instead of every step."""
        import onnxruntime as ort

        from .runtime import binding_device

        device = binding_device(None, session.device)
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, session._device_index(device))

    def _feeds(self, values: Mapping[str, Any]) -> dict:
        """The values the decoder takes; a required input nobody provides is an error."""
        from .runtime.device_cache import PAST

        feeds = {}
        for name in self.decoder.input_names:
            if name in values:
                feeds[name] = values[name]
            elif not PAST.match(name):
                raise ConfigError(f"{self.model}: the decoder takes an input {name!r} that generation does "
                                  f"not know how to feed")
        return feeds

    def prompt_rows(self, prompts: Any) -> List[List[int]]:
        rows = normalise_prompts(prompts, self.tokenizer)
        if self.special.bos is not None and not self.encoder_decoder:
            rows = [[self.special.bos] + r for r in rows]
        check_ids(rows, self.vocab_size)
        for i, r in enumerate(rows):
            if not r and not self.encoder_decoder:
                raise InputError(f"prompt {i} is empty (a decoder-only model needs at least one token; "
                                 "give bos_token_id to start from it)")
        return rows

    # ------------------------------------------------------------------ decoding
    def stream(self, prompts: Any, max_new_tokens: int = 20, sampling: Optional[SamplingConfig] = None
               ) -> Iterator[Step]:
        """Yield one `Step` per new token position, as soon as it is chosen."""
        from .runtime import DeviceKVCache

        sampling = sampling or SamplingConfig()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        rows = self.prompt_rows(prompts)
        batch, pad = len(rows), self.special.pad
        rng = sampling.rng()
        inputs = set(self.decoder.input_names)
        if self.encoder_decoder:
            src, src_mask = pad_batch(rows, pad, "right")
            self._check_length(src.shape[1], "the longest prompt")
            self._check_length(max_new_tokens, f"max_new_tokens={max_new_tokens}")
            enc_feeds = {k: v for k, v in (("input_ids", src), ("attention_mask", src_mask))
                         if k in self.encoder.input_names}
            # The encoder runs once; its states (or the cross-attention K/V computed from them)
            # stay bound for every decoder step.
            wanted = {ENCODER_OUTPUTS.get(n, n): n for n in self.encoder.output_names
                      if ENCODER_OUTPUTS.get(n, n) in inputs}
            outs = self.encoder.run_with_binding(enc_feeds, outputs=list(wanted.values()))
            static = {name: outs[out] if self.encoder.device == self.decoder.device else outs[out].numpy()
                      for name, out in wanted.items()}
            static["encoder_attention_mask"] = self._on_device(self.decoder, src_mask)
            ids = np.full((batch, 1), self.special.decoder_start, np.int64)
            mask = np.ones((batch, 1), np.int64)
            positions = np.zeros((batch, 1), np.int64)
        else:
            ids, mask = pad_batch(rows, pad, "left")
            self._check_length(ids.shape[1] + max_new_tokens - 1, f"the prompt plus max_new_tokens={max_new_tokens}")
            if "attention_mask" not in inputs and not mask.all():
                raise InputError(f"{self.model}: the decoder has no attention_mask, so prompts must have equal "
                                 "lengths")
            static = {}
            positions = position_ids(mask)
        if self.static:              # an encoder-decoder's prompt is its decoder start token
            prompt = [[self.special.decoder_start]] * batch if self.encoder_decoder else rows
            yield from self._stream_static(prompt, max_new_tokens, sampling, rng, request=static)
            return
        cache = DeviceKVCache(self.decoder, batch)
        finished = np.zeros(batch, bool)
        eos = np.array(self.special.eos, np.int64)
        warned = False
        for step in range(max_new_tokens):
            feeds = self._feeds({"input_ids": ids, "attention_mask": mask, "position_ids": positions, **static})
            logits = cache.step(feeds, fetch=["logits"])["logits"][:, -1, :]
            warned = warned or warn_nonfinite({"logits": logits}, f"{self.model}: generation step {step}") is not None
            logits = self.forced.apply(logits, step, max_new_tokens)
            tokens = np.where(finished, pad, next_tokens(logits, sampling, rng)).astype(np.int64)
            yield Step(step, tokens, ~finished)
            finished = finished | np.isin(tokens, eos)
            if finished.all():
                return
            ids = tokens[:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            positions = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)

    def _stream_static(self, rows, max_new_tokens: int, sampling: SamplingConfig, rng,
                       request: Optional[Mapping[str, Any]] = None) -> Iterator[Step]:
        """Decoding on the static cache: rows right-aligned at position 0, one token per row
        per step written into fixed buffers; `request` (an encoder-decoder's cross-attention
        K/V and encoder_attention_mask) bound once for the whole request."""
        from .runtime.static_cache import capacity_error

        batch, pad = len(rows), self.special.pad
        ids, mask = pad_batch(rows, pad, "right")
        lengths = mask.sum(axis=1)
        self._check_length(ids.shape[1] + max_new_tokens - 1, f"the prompt plus max_new_tokens={max_new_tokens}")
        why = capacity_error(lengths, max_new_tokens, self.max_length)
        if why:
            raise InputError(why)
        decoder = self.static_decoder(batch, int(lengths.max()) + max_new_tokens - 1)
        if decoder.request_names:
            decoder.bind_request(request or {})
        logits = decoder.prefill(ids, lengths)
        finished = np.zeros(batch, bool)
        eos = np.array(self.special.eos, np.int64)
        for step in range(max_new_tokens):
            logits = self.forced.apply(logits, step, max_new_tokens)
            tokens = np.where(finished, pad, next_tokens(logits, sampling, rng)).astype(np.int64)
            yield Step(step, tokens, ~finished)
            finished = finished | np.isin(tokens, eos)
            if finished.all() or step == max_new_tokens - 1:
                return
            logits = decoder.step(tokens)

    def generate(self, prompts: Any, max_new_tokens: int = 20, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                 callback: Optional[Callable[[Step], None]] = None) -> GenerationResult:
        """Generate for one prompt or a batch; `callback(step)` sees every step as it comes."""
        sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        steps: List[Step] = []
        start = time.perf_counter()
        first = None
        from .progress import phase

        # a bar over the new tokens, unless the callback shows them itself (streamed text)
        with phase("generate", total=max_new_tokens, unit="token", show=callback is None) as bar:
            for step in self.stream(prompts, max_new_tokens, sampling):
                first = first if first is not None else time.perf_counter() - start
                steps.append(step)
                bar.update(1)
                if callback is not None:
                    callback(step)
        seconds = time.perf_counter() - start
        tokens = np.stack([s.tokens for s in steps], axis=1)
        active = np.stack([s.active for s in steps], axis=1)
        ids = [tokens[i][active[i]].tolist() for i in range(tokens.shape[0])]
        text = [self.tokenizer.decode(r) for r in ids] if self.tokenizer is not None else None
        count = int(active.sum())
        return GenerationResult(ids=ids, tokens=tokens, text=text, tokens_per_s=count / seconds if seconds else 0.0,
                                seconds=seconds, prefill_seconds=first or 0.0, provider=self.provider)


def generate(model: str, prompts: Any, max_new_tokens: int = 20, **kwargs) -> GenerationResult:
    """One call: build a `Generator` for `model` and generate. Keyword arguments go to
    `Generator` (overrides, level, provider, special ids ...) or `Generator.generate`
    (do_sample, temperature, top_k, top_p, seed, callback)."""
    gen_keys = {"do_sample", "temperature", "top_k", "top_p", "seed", "callback"}
    run = {k: v for k, v in kwargs.items() if k in gen_keys}
    make = {k: v for k, v in kwargs.items() if k not in gen_keys}
    if "weights_seed" in make:
        make["seed"] = make.pop("weights_seed")
    return Generator(model, **make).generate(prompts, max_new_tokens, **run)
