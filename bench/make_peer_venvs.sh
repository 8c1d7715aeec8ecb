#!/usr/bin/env bash
# The peers' venvs for bench/generate.py, each apart from tgraph's: onnxruntime-genai pulls the CPU
# onnxruntime wheel, which must never sit beside onnxruntime-gpu.
#
#   bash bench/make_peer_venvs.sh [DIR] [genai] [optimum]     (default DIR /work/benchvenvs, both)
#
# genai:   onnxruntime-genai's runtime and its model builder, which imports torch, transformers,
#          onnx and onnx_ir to read the checkpoint (bench/generate.py's --genai-python).
# optimum: optimum-cli and ORTModelForCausalLM (--optimum-python); optimum-onnx needs an older
#          transformers than tgraph's tests use, which is why it has its own venv.
set -euo pipefail
dir=${1:-/work/benchvenvs}
shift || true
which=${*:-genai optimum}
mkdir -p "$dir"
for name in $which; do
  case $name in
    genai)   pkgs=(onnxruntime-genai==0.18.0 torch==2.13.0 "transformers>=4.57" onnx onnx-ir) ;;
    optimum) pkgs=(optimum-onnx torch==2.13.0 "transformers<4.58" onnxruntime) ;;
    *) echo "make_peer_venvs: unknown peer '$name' (genai, optimum)" >&2; exit 2 ;;
  esac
  if [ ! -x "$dir/$name/bin/python" ]; then python3 -m venv "$dir/$name"; fi
  "$dir/$name/bin/pip" install -q "${pkgs[@]}"
  echo "$dir/$name/bin/python: $("$dir/$name/bin/python" -c 'import importlib.metadata as m, sys; print(", ".join(f"{p} {m.version(p)}" for p in sys.argv[1:]))' "${pkgs[0]%%=*}" onnxruntime transformers)"
done
