#!/bin/sh
# Make a throwaway CA, server certificates for shop/admin.example.com, a client certificate,
# and write them as kubernetes.io/tls Secrets to secrets.yaml (both git-ignored).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
d="$here/.certs"
mkdir -p "$d"
cd "$d"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=edgemesh example CA" -keyout ca.key -out ca.crt 2>/dev/null
for name in shop.example.com admin.example.com client.example; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
        -keyout "$name.key" -out "$name.csr" 2>/dev/null
    printf 'subjectAltName=DNS:%s\n' "$name" > "$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
        -extfile "$name.ext" -out "$name.crt" 2>/dev/null
done
b64() { base64 -w0 < "$1"; }
secret() {  # name cert key [ca]
    printf -- '---\napiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\n'
    printf 'metadata: {name: %s, namespace: gw-https}\ndata:\n' "$1"
    printf '  tls.crt: %s\n  tls.key: %s\n' "$(b64 "$2")" "$(b64 "$3")"
    if [ $# -ge 4 ]; then printf '  ca.crt: %s\n' "$(b64 "$4")"; fi
}
{
    secret shop-cert shop.example.com.crt shop.example.com.key
    secret admin-cert admin.example.com.crt admin.example.com.key ca.crt
} > "$here/secrets.yaml"
echo "wrote $here/secrets.yaml; client cert: $d/client.example.crt / .key"
