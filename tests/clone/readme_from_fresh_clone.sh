#!/usr/bin/env bash
# A user's first minutes: clone the repository's committed HEAD into an empty temporary folder
# (nothing beside the clone), and run the README's first command there word for word: it
# installs what is missing, configures, builds train_mixture alone and runs it. Passes only if the
# example prints its success line (CTest matches it) and exits 0.
#
#   readme_from_fresh_clone.sh SOURCE_DIR
#
# Exits 77 (CTest: skipped, not passed) where SOURCE_DIR is not a git checkout, e.g. a tarball.
set -euo pipefail
source_dir=$1
if ! head=$(git -C "$source_dir" rev-parse --verify -q HEAD); then
  echo "readme_from_fresh_clone: $source_dir is not a git checkout with a commit; nothing to clone"
  exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q --no-hardlinks "$source_dir" "$work/moekit"
cd "$work/moekit"
echo "readme_from_fresh_clone: HEAD $head cloned alone into $work: $(ls -A "$work")"

first_command=$(grep -m1 -E '^bash cmake/install_deps.sh .*--target train_mixture' README.md) || {
  echo "readme_from_fresh_clone: README.md has no first command that builds train_mixture" >&2
  exit 1
}
echo "readme_from_fresh_clone: running the README's first command: $first_command"
bash -c "$first_command" 2>&1 | tee "$work/output"
grep -q '^train_mixture: passed' "$work/output" || {
  echo "readme_from_fresh_clone: train_mixture did not print its success line" >&2
  exit 1
}
echo "readme_from_fresh_clone: passed"
