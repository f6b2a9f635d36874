#!/usr/bin/env bash
# Installs what tests/test_web_sdk.py needs: Debian's Chromium and the official
# mParticle web SDK (pinned in tests/browser/package-lock.json).
# Idempotent: each step is skipped when its result is already present.
# Browsers are never downloaded by a test tool (no `playwright install`).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
browser_dir="$repo_root/tests/browser"
sdk_bundle="$browser_dir/node_modules/@mparticle/web-sdk/dist/mparticle.js"
sdk_version="2.68.0"

if [ ! -x /usr/bin/chromium ]; then
    echo "install-browser: installing Debian chromium"
    sudo_cmd=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo_cmd="sudo"
    fi
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi
echo "install-browser: $(/usr/bin/chromium --version 2>/dev/null | tail -n 1)"

installed_version=""
if [ -f "$browser_dir/node_modules/@mparticle/web-sdk/package.json" ]; then
    installed_version="$(node -p "require('$browser_dir/node_modules/@mparticle/web-sdk/package.json').version" 2>/dev/null || true)"
fi
if [ ! -f "$sdk_bundle" ] || [ "$installed_version" != "$sdk_version" ]; then
    echo "install-browser: installing @mparticle/web-sdk@$sdk_version into tests/browser"
    cd "$browser_dir"
    if [ -f package-lock.json ]; then
        npm ci --no-audit --no-fund --loglevel=error
    else
        npm install --no-audit --no-fund --loglevel=error "@mparticle/web-sdk@$sdk_version"
    fi
fi
echo "install-browser: @mparticle/web-sdk $sdk_version at $sdk_bundle"
