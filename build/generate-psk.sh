#!/bin/sh
# Generate the cluster pre-shared key that proves mesh membership (build/psk, mode 0600).
# kustomize's secretGenerator turns it into the Secret edgemesh-psk; nothing ships a default.
#   build/generate-psk.sh            # once per cluster; keep the file out of git
#   kubectl apply -k build/
# Rotating: generate, apply, then restart the agents, servers and gateways together.
set -eu
here=$(dirname "$0")
out="$here/psk"
if [ -s "$out" ] && [ "${1:-}" != "--force" ]; then
    echo "$out exists; pass --force to replace it (every node must then get the new key)" >&2
    exit 1
fi
umask 077
openssl rand -base64 32 > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out"
