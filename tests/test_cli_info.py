"""`tgraph models`, `config`, `passes`, `doctor` and `--version`: what they print is what is there.

References nobody here wrote: the `model_type` of transformers' own config classes, the
versions onnx and onnxruntime report of themselves, onnxruntime's provider list, and the
dlopen error the CUDA provider library gives (ctypes) against what doctor found with ldd.
"""
import dataclasses
import json
import textwrap
from dataclasses import dataclass
from typing import Optional

import onnx
import onnxruntime as ort
import pytest

import tgraph
from tgraph.cli import main
from tgraph.cli_info import doctor_lines
from tgraph.doctor import gpu_devices, missing_libraries
from tgraph.models import MODELS
from tgraph.models.config_docs import SHARED_MEANINGS, config_keys, field_docs
from tgraph.runtime.providers import cuda_load_error, describe_providers


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_names_tgraph_onnx_and_onnxruntime(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert f"tgraph {tgraph.__version__}" in out and f"onnx {onnx.__version__}" in out
    assert ort.__version__ in out


def test_models_lists_every_family_with_transformers_model_types(capsys):
    import transformers

    code, out, err = run_cli(capsys, "models", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(MODELS)
    hf = {"gpt": [transformers.OpenAIGPTConfig], "gpt2": [transformers.GPT2Config], "bert": [transformers.BertConfig],
          "roberta": [transformers.RobertaConfig], "albert": [transformers.AlbertConfig], "t5": [transformers.T5Config],
          "llama": [transformers.LlamaConfig, transformers.MistralConfig, transformers.Qwen2Config],
          "palm": [transformers.GPTNeoXConfig]}
    for family, classes in hf.items():
        assert sorted(c.model_type for c in classes) == rows[family]["hf_model_types"], family
    assert rows["transformer"]["hf_model_types"] == []
    code, out, _ = run_cli(capsys, "models")
    assert "gpt2" in out and "model_type: llama, mistral, qwen2" in out


def test_every_config_key_of_every_model_has_a_meaning():
    missing = [f"{name}.{k.name}" for name, fam in sorted(MODELS.items()) for k in config_keys(fam.config_cls)
               if not k.meaning]
    assert not missing, f"config keys without a comment in their dataclass: {missing}"


def test_shared_meanings_are_shared_and_used():
    """A name explained once for all families must be used by two or more (else it belongs in the family's comment)."""
    users = {name: [f for f, fam in MODELS.items() if name in {x.name for x in dataclasses.fields(fam.config_cls)}]
             for name in SHARED_MEANINGS}
    lonely = {n: u for n, u in users.items() if len(u) < 2}
    assert not lonely, lonely


@pytest.mark.parametrize("family", sorted(MODELS))
def test_config_lists_every_key_with_its_type_and_default(capsys, family):
    code, out, err = run_cli(capsys, "config", family, "--json")
    assert code == 0, err
    rows = json.loads(out)
    cls = MODELS[family].config_cls
    assert [r["key"] for r in rows] == [f.name for f in dataclasses.fields(cls)]
    instance = cls()                                    # the defaults, as the dataclass itself makes them
    for r in rows:
        value = getattr(instance, r["key"])
        expected = {True: "true", False: "false", None: "none"}.get(value, str(value)) \
            if isinstance(value, (bool, type(None))) else str(value)
        assert r["default"] == expected, r
        assert r["type"].split(" or ")[0] in ("int", "float", "bool", "str", "from config.json"), r


def test_config_shows_the_cache_and_part_keys(capsys):
    code, out, err = run_cli(capsys, "config", "t5")
    assert code == 0, err
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert lines["part"].split()[1:3] == ["str", "full"] and "encoder" in lines["part"]
    assert lines["use_cache"].split()[1:3] == ["bool", "false"] and "KV-cache" in lines["use_cache"]
    assert "--set KEY=VALUE" in out


def test_config_of_a_checkpoint_dir_shows_its_values(tmp_path, capsys):
    import transformers

    transformers.GPT2Config(n_layer=3, n_embd=48, n_head=6, n_positions=96, vocab_size=101).save_pretrained(tmp_path)
    code, out, err = run_cli(capsys, "config", str(tmp_path), "--json")
    assert code == 0, err
    values = {r["key"]: r["default"] for r in json.loads(out)}
    assert (values["n_layer"], values["n_embd"], values["n_head"], values["vocab_size"]) == ("3", "48", "6", "101")


def test_config_of_an_unknown_model_suggests_one(capsys):
    code, _, err = run_cli(capsys, "config", "gtp2")
    assert code == 2 and err.count("\n") == 1
    assert "did you mean 'gpt2'" in err and "tgraph models" in err


def test_field_docs_reads_trailing_continued_and_preceding_comments():
    @dataclass
    class Demo:
        alpha: int = 1                    # trailing comment
        beta: Optional[int] = None        # first part,
                                          # second part
        # the comment above gamma
        gamma: float = 2.0
        delta: bool = True

    docs = field_docs(Demo)
    assert docs["alpha"] == "trailing comment"
    assert docs["beta"] == "first part, second part"
    assert docs["gamma"] == "the comment above gamma"
    assert "delta" not in docs
    keys = {k.name: k for k in config_keys(Demo)}
    assert keys["beta"].type == "int or none" and keys["delta"].meaning == ""


def test_passes_prints_the_level_table_in_order(capsys):
    from tgraph.passes import LEVELS, PASSES

    code, out, err = run_cli(capsys, "passes")
    assert code == 0, err
    for level, names in LEVELS.items():
        line = next(l for l in out.splitlines() if l.strip().startswith(f"-O{level}:"))
        assert line.split(":", 1)[1].strip() == (", ".join(names) or "(nothing: the graph as built)")
    listed = json.loads(run_cli(capsys, "passes", "--json")[1])
    assert {r["name"] for r in listed["passes"]} == set(PASSES)
    assert listed["levels"]["O2"] == LEVELS[2]
    fold = next(r for r in listed["passes"] if r["name"] == "fold-constants")
    assert fold["options"]["max-elements"] == str(PASSES["fold-constants"]().max_elements)


LDD = textwrap.dedent("""\
    \tlinux-vdso.so.1 (0x00007ffd5a9e8000)
    \tlibcublasLt.so.13 => not found
    \tlibcudnn.so.9 => /usr/lib/x86_64-linux-gnu/libcudnn.so.9 (0x00007f0e1c000000)
    \tlibcuda.so.1 => not found
    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0e1bc00000)
""")


def test_doctor_parsers():
    assert missing_libraries(LDD) == ["libcublasLt.so.13", "libcuda.so.1"]
    assert missing_libraries("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n") == []
    assert gpu_devices(["null", "nvidia10", "nvidiactl", "nvidia2", "nvidia-uvm", "nvidia0"]) == \
        ["nvidia0", "nvidia2", "nvidia10"]


def _facts(**changes):
    facts = {"tgraph": "0.1.0", "python": "3.11", "platform": "Linux x86_64", "onnx": "1.23",
             "onnxruntime_wheels": [{"name": "onnxruntime-gpu", "version": "1.31.1"}], "onnxruntime": "1.31.1",
             "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "cuda": {"library": "/x/libonnxruntime_providers_cuda.so", "missing": [], "load_error": None},
             "gpu": {"devices": ["/dev/nvidia0"], "driver": "NVRM 580", "nvidia_smi": None}}
    facts.update(changes)
    return facts


def test_doctor_verdicts():
    assert doctor_lines(_facts())[-1].startswith("CUDA: should work")
    text = "\n".join(doctor_lines(_facts(cuda={"library": "l", "missing": missing_libraries(LDD), "load_error": "x"},
                                         gpu={"devices": [], "driver": None, "nvidia_smi": None})))
    assert "not usable" in text and "libcublasLt.so.13, libcuda.so.1 (the NVIDIA driver's)" in text
    assert "no NVIDIA GPU is visible" in text
    text = "\n".join(doctor_lines(_facts(providers=["CPUExecutionProvider"], cuda=None)))
    assert "install onnxruntime-gpu" in text
    two = [{"name": "onnxruntime", "version": "1.31"}, {"name": "onnxruntime-gpu", "version": "1.31.1"}]
    assert "overwrite each other" in "\n".join(doctor_lines(_facts(onnxruntime_wheels=two)))


def test_doctor_on_this_machine(capsys):
    code, out, err = run_cli(capsys, "doctor")
    assert code == 0, err
    assert f"onnxruntime {ort.__version__}" in out
    for provider in ort.get_available_providers():
        assert provider in out
    reason = cuda_load_error(ort) if "CUDAExecutionProvider" in ort.get_available_providers() else None
    if reason:                          # ctypes' dlopen names a library: doctor (via ldd) must name it too
        assert reason.split(":")[0] in out and "CUDA: not usable" in out


def test_short_provider_descriptions():
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    err = "libcublasLt.so.13: cannot open shared object file"
    assert describe_providers([cpu], available=[cuda, cpu], cuda_error=err, verbose=False) == \
        "CPUExecutionProvider (CUDA not available)"
    assert describe_providers([cpu], available=[cuda, cpu], cuda_error=err, verbose=False, hint="see x") == \
        "CPUExecutionProvider (CUDA not available; see x)"
    assert describe_providers([cpu], request="cpu", available=[cuda, cpu], verbose=False) == cpu
    assert describe_providers([cuda, cpu], 1, available=[cuda, cpu], verbose=False) == "CUDAExecutionProvider (device 1)"
