#!/usr/bin/env bash
# Runs every test of the workspace. Installs what the tests need when it is
# missing (CI machines start with empty package lists), so it works on a
# fresh Debian/Ubuntu machine with only a Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} for the tests"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi
# The Redis package may start a system instance on 6379; the tests never use
# it: each starts its own redis-server on a free loopback port.

cargo test --workspace --locked "$@"
