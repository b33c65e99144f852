#!/usr/bin/env bash
# Lints every shell script of the repository with shellcheck (make lint). shellcheck is Debian's package:
# installed here once where apt and root are, else named in one line.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v shellcheck >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "shellcheck: installing Debian's shellcheck package"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck >/dev/null
  fi
  command -v shellcheck >/dev/null || { echo "shellcheck: missing shellcheck (Debian package shellcheck)" >&2; exit 2; }
fi
mapfile -t scripts < <(git ls-files '*.sh')
shellcheck --external-sources "${scripts[@]}"
echo "shellcheck: ${#scripts[@]} scripts clean"
