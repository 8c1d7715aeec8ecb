"""`tgraph generate MODEL ...`: text or token ids in, generated tokens out.

    tgraph generate MODEL (--prompt TEXT ... | --prompt-ids 1,2,3 ...) [--max-new-tokens N]
                    [--greedy | --temperature T --top-k K --top-p P] [--seed S]
                    [--provider auto|cpu|cuda] [--json] [--stream]

Greedy unless a sampling option is given. `--seed` seeds sampling (`--init-seed` the random
weights of a registered model). `--json` prints exactly {"ids", "text", "tokens_per_s"} for
one prompt and a list of such objects (one per prompt, in order) for several; the provider
line then goes to stderr, so stdout is only JSON. `--stream` prints tokens as they come:
with a tokenizer, text, never half a character (one prompt: the pieces in one line;
several: one line "[row] piece" per new piece, newlines in a piece written as \\n);
without one, one line of ids per step (one column per prompt, "-" once a row has finished).
"""
from __future__ import annotations

import json
import sys
from typing import List

from .cli_args import parse_sets, provider_text
from .errors import ConfigError


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="generate tokens with a KV-cached decoder")
    p.set_defaults(handler=cmd_generate)
    p.add_argument("model", metavar="MODEL", help="registered name, path/to/file.py:factory, or checkpoint dir")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a text prompt (needs tokenizer.json); repeat "
                   "for a batch")
    p.add_argument("--prompt-ids", action="append", metavar="1,2,3", help="a prompt as token ids; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--eos-id", type=int, action="append", default=None, help="end-of-sequence id (repeatable)")
    p.add_argument("--pad-id", type=int, default=None, help="id of padding and of finished rows")
    p.add_argument("--bos-id", type=int, default=None,
                   help="prepended to decoder-only prompts; an encoder-decoder's first decoder token")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-O", dest="level", type=int, choices=[0, 1, 2, 3], default=None,
                   help="optimization level (default 3)")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                   help="override a config key (`tgraph config MODEL` lists them)")
    p.add_argument("--init-seed", type=int, default=0, help="seed for random weight initialisation")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--json", action="store_true", help='print {"ids", "text", "tokens_per_s"} (a list for a batch)')
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")


def parse_ids(text: str) -> List[int]:
    items = [t.strip() for t in text.split(",")]
    if not items or not all(t.isdigit() for t in items):
        raise ConfigError(f"--prompt-ids expects comma-separated non-negative ints, e.g. 1,2,3; got {text!r}")
    return [int(t) for t in items]


def _sampling(args) -> dict:
    chosen = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p))
              if v is not None}
    if args.greedy and chosen:
        raise ConfigError(f"--greedy cannot be combined with --{next(iter(chosen)).replace('_', '-')}")
    return {"do_sample": bool(chosen), "seed": args.seed, **chosen}


class _Printer:
    """Streams steps: text pieces (whole characters) with a tokenizer, else ids per step."""

    def __init__(self, gen, batch: int, out):
        self.batch, self.out = batch, out
        self.decoders = [gen.tokenizer.stream_decoder() for _ in range(batch)] if gen.tokenizer is not None else None
        self.count = 0

    def __call__(self, step) -> None:
        if self.decoders is None:
            if self.batch == 1:
                if step.active[0]:
                    self._write(("" if not self.count else " ") + str(int(step.tokens[0])))
                    self.count += 1
            else:
                cells = [str(int(t)) if a else "-" for t, a in zip(step.tokens, step.active)]
                print(" ".join(cells), file=self.out, flush=True)
            return
        for row, (token, active) in enumerate(zip(step.tokens, step.active)):
            if active:
                self._piece(row, self.decoders[row].step(int(token)))

    def _piece(self, row: int, piece: str) -> None:
        if not piece:
            return
        if self.batch == 1:
            self._write(piece)
        else:
            print(f"[{row}] {piece.replace(chr(10), chr(92) + 'n')}", file=self.out, flush=True)

    def _write(self, text: str) -> None:
        print(text, end="", file=self.out, flush=True)

    def close(self) -> None:
        for row, decoder in enumerate(self.decoders or []):
            self._piece(row, decoder.finish())
        if self.batch == 1:
            print(file=self.out, flush=True)


def _cap_new_tokens(gen, prompts, wanted: int, quiet: bool = False) -> int:
    """`wanted`, or fewer where the model's positions end first (with a note on stderr):
    a decoder-only row needs len(prompt) + new - 1 positions, an encoder-decoder's decoder `new`."""
    from .generate import POSITION_LIMITS

    limit = next((int(getattr(gen.config, k)) for k in POSITION_LIMITS if hasattr(gen.config, k)), None)
    if limit is None:
        return wanted
    longest = max(len(r) for r in gen.prompt_rows(prompts))
    room = limit if gen.encoder_decoder else limit - longest + 1
    if room < 1 or wanted <= room:
        return wanted                       # fits, or the prompt alone is too long: generate says so
    where = "" if gen.encoder_decoder else f", {longest} taken by the longest prompt"
    if not quiet:
        print(f"tgraph: note: --max-new-tokens {wanted} capped to {room} (the model has {limit} positions{where})",
              file=sys.stderr)
    return room


def cmd_generate(args) -> int:
    from .generate import DEFAULT_GENERATE_LEVEL, Generator

    if args.prompt and args.prompt_ids:
        raise ConfigError("give --prompt or --prompt-ids, not both")
    if not args.prompt and not args.prompt_ids:
        raise ConfigError("give --prompt TEXT or --prompt-ids 1,2,3 (repeat either for a batch)")
    prompts = list(args.prompt) if args.prompt else [parse_ids(t) for t in args.prompt_ids]
    sampling = _sampling(args)
    special = {k: v for k, v in (("eos_token_id", args.eos_id), ("pad_token_id", args.pad_id),
                                  ("bos_token_id", args.bos_id)) if v is not None}
    gen = Generator(args.model, overrides=parse_sets(args.sets), level=DEFAULT_GENERATE_LEVEL if args.level is None
                    else args.level, provider=args.provider, threads=args.threads, seed=args.init_seed,
                    dtype=args.dtype, **special)
    if args.prompt and gen.tokenizer is None:
        raise ConfigError(f"{args.model}: no tokenizer.json, so text prompts cannot be encoded "
                          "(give --prompt-ids instead)")
    info = sys.stderr if args.json else sys.stdout
    printer = _Printer(gen, len(prompts), info if args.json else sys.stdout) if args.stream else None
    max_new = _cap_new_tokens(gen, prompts, args.max_new_tokens, args.quiet)
    result = gen.generate(prompts, max_new, callback=printer, **sampling)
    if printer is not None:
        printer.close()
    if args.json:
        rows = result.as_json()
        print(json.dumps(rows[0] if len(rows) == 1 else rows))
    elif not args.stream:
        for i, ids in enumerate(result.ids):
            prefix = f"[{i}] " if len(result.ids) > 1 else ""
            print(prefix + (result.text[i] if result.text is not None else " ".join(map(str, ids))))
    count = sum(len(r) for r in result.ids)
    print(f"{count} new tokens in {result.seconds:.3f}s ({result.tokens_per_s:.1f} tokens/s) "
          f"on {provider_text(gen.decoder, args)}", file=info)
    return 0
