"""A saved checkpoint in a Hugging Face cache layout loads as remote code where `modeling_rmt` cannot be
imported, offline, through the Auto classes and `pipeline`, and gives the in-process scores."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase, pipeline

from conversion.export import HUB_FILES as HUB_CODE_FILES
from conversion.from_backbone import LONG_DOCUMENT_TOKENS, convert_backbone
from modeling_rmt import RMTForSequenceClassification
from rmt_demo.demo import synthetic_document
from rmt_tools.backbones import minilm_path

HUB_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", *HUB_CODE_FILES}
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# A fresh process in which the project's packages cannot be imported, whatever is installed.
NO_LOCAL_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoLocalPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_rmt", "conversion"):
                raise ModuleNotFoundError(f"{name} is blocked in this process")

    sys.meta_path.insert(0, NoLocalPackage())
    """
)
FRESH_PROCESS = NO_LOCAL_PACKAGE + textwrap.dedent(
    """    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, pipeline

    repo, text_file, resave = sys.argv[1:4]
    text = open(text_file).read()
    try:
        import modeling_rmt  # noqa: F401
        sys.exit("modeling_rmt must not be importable here")
    except ModuleNotFoundError:
        pass
    classifier = pipeline("text-classification", model=repo, trust_remote_code=True)
    scores = classifier(text, top_k=None)
    model = AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(repo, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
    short = tokenizer(text[:5000], return_tensors="pt")
    model.save_pretrained(resave)
    reloaded = AutoModelForSequenceClassification.from_pretrained(resave, trust_remote_code=True).eval()
    with torch.no_grad():
        resaved_equal = torch.equal(model(**short).logits, reloaded(**short).logits)
    print(json.dumps({
        "scores": {s["label"]: s["score"] for s in scores},
        "classes": [type(model).__name__, type(base).__name__, type(classifier.model).__name__],
        "modules": [type(model).__module__, type(base).__module__],
        "resaved_equal": resaved_equal,
        "tokens": len(tokenizer(text).input_ids),
    }))
    """
)


def hub_cache_layout(folder: Path, cache: Path, repo_id: str) -> None:
    """Lay out `folder` as the Hub cache would after downloading `repo_id` at COMMIT."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / COMMIT)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)


def run_offline(script: str, args: list[str], cache: Path, folder: Path) -> subprocess.CompletedProcess:
    """Run `script` in a fresh offline Python reading the Hub cache at `cache`, from `folder`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HOME", "TRANSFORMERS_CACHE")}
    env.update(HF_HUB_CACHE=str(cache), HF_MODULES_CACHE=str(folder / "modules"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", script, *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def saved_twice(tmp_path_factory) -> Path:
    """An RMT-MiniLM checkpoint, loaded from the installed package and saved again."""
    first = tmp_path_factory.mktemp("first")
    torch.manual_seed(0)
    convert_backbone(str(minilm_path()), first, num_labels=3, num_mem_tokens=10)
    second = tmp_path_factory.mktemp("second")
    model = AutoModelForSequenceClassification.from_pretrained(first)
    assert type(model) is RMTForSequenceClassification  # the installed class, not remote code
    model.save_pretrained(second)
    AutoTokenizer.from_pretrained(first).save_pretrained(second)
    return second


def test_conversion_never_writes_over_a_folder_nor_leaves_a_half_written_one(saved_twice, tmp_path, monkeypatch):
    before = {path.name: path.read_bytes() for path in saved_twice.iterdir()}
    with pytest.raises(ValueError, match="not empty"):
        convert_backbone(str(saved_twice), saved_twice, num_labels=3)  # the source folder itself
    assert {path.name: path.read_bytes() for path in saved_twice.iterdir()} == before

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"):
        convert_backbone(str(minilm_path()), tmp_path / "new", num_labels=3, num_mem_tokens=10)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy


def test_saved_folder_holds_code_auto_map_and_a_long_document_tokenizer(saved_twice):
    assert HUB_FILES <= {p.name for p in saved_twice.iterdir()}
    config = json.loads((saved_twice / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_rmt.RMTConfig",
        "AutoModel": "modeling_rmt.RMTModel",
        "AutoModelForSequenceClassification": "modeling_rmt.RMTForSequenceClassification",
        "AutoModelForCausalLM": "modeling_rmt.RMTForCausalLM",
    }
    allowed = ("torch", "transformers", *sys.stdlib_module_names)  # what any environment with transformers has
    for source in (saved_twice / name for name in HUB_FILES if name.endswith(".py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = ["." if node.level else node.module]
            else:
                continue
            for module in modules:  # relative imports of siblings, or torch / transformers / the standard library
                assert module == "." or module.split(".")[0] in allowed, f"{source.name} imports {module}"
    assert AutoTokenizer.from_pretrained(saved_twice).model_max_length == LONG_DOCUMENT_TOKENS


def test_fresh_offline_process_loads_remote_code_from_the_hub_cache(saved_twice, tmp_path):
    cache = tmp_path / "hub"
    hub_cache_layout(saved_twice, cache, "org/rmt-bert")
    tokenizer = AutoTokenizer.from_pretrained(saved_twice)
    text = synthetic_document(20_000, tokenizer, seed=3)
    text_file = tmp_path / "document.txt"
    text_file.write_text(text)
    result = run_offline(FRESH_PROCESS, ["org/rmt-bert", str(text_file), str(tmp_path / "resaved")], cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["classes"] == ["RMTForSequenceClassification", "RMTModel", "RMTForSequenceClassification"]
    assert all(module.startswith("transformers_modules") for module in remote["modules"])
    assert remote["resaved_equal"] is True
    assert remote["tokens"] >= 20_000

    # The same document in this process, through the installed classes, untruncated.
    model = AutoModelForSequenceClassification.from_pretrained(saved_twice).eval()
    with torch.no_grad():
        probabilities = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
    expected = {model.config.id2label[i]: p.item() for i, p in enumerate(probabilities)}
    local = pipeline("text-classification", model=model, tokenizer=tokenizer)(text, top_k=None)
    assert {s["label"]: s["score"] for s in local} == pytest.approx(expected, abs=1e-6)
    assert remote["scores"] == pytest.approx(expected, abs=1e-5)


FRESH_GENERATION = NO_LOCAL_PACKAGE + textwrap.dedent(
    """    from transformers import AutoModelForCausalLM, pipeline

    repo, prompt = sys.argv[1:3]
    generator = pipeline("text-generation", model=repo, trust_remote_code=True)
    text = generator(prompt, max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
    print(json.dumps({"text": text, "class": type(model).__name__, "module": type(model).__module__}))
    """
)


@pytest.mark.parametrize("memory_type", ["rmt", "armt"])
def test_fresh_offline_process_generates_with_the_causal_lm_from_the_hub_cache(tmp_path, memory_type):
    from conftest import word_tokenizer
    from test_armt import ARMT, tiny_armt_lm
    from test_causal_lm import VOCAB, prompts, tiny_lm

    model = tiny_lm("llama") if memory_type == "rmt" else tiny_armt_lm("llama", **ARMT)
    tokenizer = word_tokenizer(VOCAB)
    folder = tmp_path / "rmt-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompt = " ".join(f"w{i}" for i in prompts([13])[0].tolist())  # three segments of 5 and a partial one
    with torch.no_grad():
        ids = tokenizer(prompt, return_tensors="pt")
        expected = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[
            0, ids.input_ids.shape[1] :
        ]
    cache = tmp_path / "hub"
    hub_cache_layout(folder, cache, "org/rmt-llama")
    result = run_offline(FRESH_GENERATION, ["org/rmt-llama", prompt], cache, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["class"] == "RMTForCausalLM" and remote["module"].startswith("transformers_modules")
    assert remote["text"].split() == tokenizer.decode(expected, skip_special_tokens=True).split()
    assert len(remote["text"].split()) >= 6
