"""Triton Python-backend model: text generation over a tgraph static-KV-cache decoder.

Copied by `tgraph deploy triton` into REPO/NAME/1/model.py; never imported by tgraph itself.
It needs only NumPy (and `tokenizers` for text), which Triton's Python backend has or can
install, not tgraph. Each request is one prompt:

    inputs   text_input (string) or input_ids (int64 [n]); max_tokens (int32, default 16);
             temperature (fp32, default 0 = greedy); top_p (fp32, default 1); seed (int64)
    outputs  output_ids (int64 [m], the new tokens), text_output (string; "" without tokenizer)

The loop calls the decoder model (config parameter `decoder_model`, REPO/NAME_decoder) once
for the prompt and once per new token through business-logic scripting (BLS): the cache
goes in as past_key_values.* and comes back as present.*, the whole buffer, positions
0..n-1 valid; attention_mask marks them (decoder.json, written beside this file, gives
the cache's names, heads, head size and capacity, and the special ids).
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

DEFAULT_MAX_TOKENS = 16


class RequestError(ValueError):
    """A request this model refuses; its message goes back to the client."""


def _scalar(request, name, default, cast):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    array = tensor.as_numpy().reshape(-1)
    if array.size != 1:
        raise RequestError(f"{name} must hold one value, got {array.size}")
    return cast(array[0])


def _sample(logits, temperature, top_p, rng):
    """The next token from one row of logits: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < top_p      # always keeps the most likely token
        mask = np.zeros_like(p, bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = Path(args["model_repository"]) / args["model_version"]
        self.decoder_model = config["parameters"]["decoder_model"]["string_value"]
        self.decoder = json.loads((here / "decoder.json").read_text())
        self.tokenizer = None
        if (here / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(here / "tokenizer.json"))

    # ---------------------------------------------------------------- one request
    def _prompt(self, request):
        text = pb_utils.get_input_tensor_by_name(request, "text_input")
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if (text is None) == (ids is None):
            raise RequestError("give text_input or input_ids (one of them)")
        if ids is not None:
            rows = ids.as_numpy().astype(np.int64).reshape(-1).tolist()
        else:
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer.json; send input_ids")
            value = text.as_numpy().reshape(-1)[0]
            rows = self.tokenizer.encode(value.decode() if isinstance(value, bytes) else str(value)).ids
        if self.decoder.get("bos") is not None:
            rows = [self.decoder["bos"]] + list(rows)
        if not rows:
            raise RequestError("the prompt is empty")
        return rows

    def _run(self, ids, mask, cache):
        inputs = [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]
        inputs += [pb_utils.Tensor(p["name"], cache[p["name"]]) for p in self.decoder["pasts"]]
        wanted = ["logits"] + [p["present"] for p in self.decoder["pasts"]]
        response = pb_utils.InferenceRequest(model_name=self.decoder_model, inputs=inputs,
                                             requested_output_names=wanted).exec()
        if response.has_error():
            raise RuntimeError(f"{self.decoder_model}: {response.error().message()}")
        out = {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in wanted}
        for p in self.decoder["pasts"]:
            cache[p["name"]] = out[p["present"]]
        return out["logits"][0, -1]

    def generate(self, request):
        prompt = self._prompt(request)
        max_tokens = _scalar(request, "max_tokens", DEFAULT_MAX_TOKENS, int)
        temperature = _scalar(request, "temperature", 0.0, float)
        top_p = _scalar(request, "top_p", 1.0, float)
        seed = _scalar(request, "seed", None, int)
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise RequestError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        length = len(prompt) + max_tokens - 1
        if length > self.decoder["max_length"]:
            raise RequestError(f"the prompt ({len(prompt)} tokens) plus max_tokens={max_tokens} needs {length} "
                               f"positions; the cache holds {self.decoder['max_length']}")
        cache = {p["name"]: np.zeros((1, p["heads"], length, p["head_size"]), p["dtype"])
                 for p in self.decoder["pasts"]}
        n = len(prompt)
        logits = self._run(np.array([prompt], np.int64), np.ones((1, n), np.int64), cache)
        mask = np.zeros((1, length), np.int64)
        mask[0, :n] = 1
        rng = np.random.default_rng(seed)
        new = []
        for step in range(max_tokens):
            token = _sample(logits, temperature, top_p, rng)
            new.append(token)
            if token in self.decoder["eos"] or step == max_tokens - 1:
                break
            mask[0, n] = 1                     # the new token's position joins the context
            n += 1
            logits = self._run(np.array([[token]], np.int64), mask.copy(), cache)
        text = self.tokenizer.decode(new, skip_special_tokens=True) if self.tokenizer is not None else ""
        return [pb_utils.Tensor("output_ids", np.array(new, np.int64)),
                pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_))]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self.generate(request)))
            except Exception as e:  # one request's failure never takes the model down
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(e).__name__}: {e}".splitlines()[0])))
        return responses
