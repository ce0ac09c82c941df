#!/usr/bin/env bash
# Run HERE. A device call carries at most 64 MiB, working tree included, and the tracked tree is larger
# (~92 MB: shipped checkpoints and result plots). `slim.sh on` takes the paths below out of git's index
# (the files stay on disk) and lists them in .git/info/exclude, so a device call leaves them behind; the Gumiho
# checkpoint then travels only in calls that name it in `carry`. `slim.sh off` puts everything back.
# Never commit while slim: the index lacks these paths.
set -euo pipefail
cd "$(dirname "$0")/../.."
PATHS="drafters/checkpoints/smollm2-gumiho drafters/checkpoints/smollm2-draft drafters/checkpoints/smollm2-medusa
drafters/checkpoints/smollm2-eagle-wide bench/results"
EXCLUDE=.git/info/exclude
case "${1:-}" in
  on)
    mkdir -p .git/info
    for p in $PATHS; do
      git rm -r -q --cached "$p"
      grep -qxF "/$p/" "$EXCLUDE" 2>/dev/null || echo "/$p/" >> "$EXCLUDE"
    done
    size=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
    echo "slim: the working tree that travels is $((size / 1048576)) MiB";;
  off)
    # shellcheck disable=SC2086
    git reset -q -- $PATHS
    for p in $PATHS; do sed -i "\#^/$p/\$#d" "$EXCLUDE"; done
    git status --short | head;;
  *) echo "usage: bash bench/gpu/slim.sh on|off"; exit 2;;
esac
