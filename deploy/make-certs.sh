#!/usr/bin/env bash
# Make a CA, TLS certificates for the SuperLink, MinIO and the registry, SuperNode auth key pairs, and the
# server's Ed25519 key pair that signs fused versions.
#   deploy/make-certs.sh [OUT=deploy/certs] [SUPERLINK_HOST=superlink] [NODES=2]
set -euo pipefail
OUT=${1:-deploy/certs}; HOST=${2:-superlink}; NODES=${3:-2}
mkdir -p "$OUT"
openssl req -x509 -newkey rsa:4096 -nodes -days 365 -subj "/CN=mixshow-ca" -keyout "$OUT/ca.key" -out "$OUT/ca.crt"
for name in "$HOST" minio registry; do
  openssl req -newkey rsa:4096 -nodes -subj "/CN=$name" -keyout "$OUT/$name.key" -out "$OUT/$name.csr"
  printf "subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\n" "$name" > "$OUT/$name.ext"
  openssl x509 -req -in "$OUT/$name.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial -days 365 \
    -extfile "$OUT/$name.ext" -out "$OUT/$name.crt"
  rm "$OUT/$name.csr" "$OUT/$name.ext"
done
cp "$OUT/$HOST.crt" "$OUT/superlink.crt" 2>/dev/null || true
cp "$OUT/$HOST.key" "$OUT/superlink.key" 2>/dev/null || true
for i in $(seq 1 "$NODES"); do
  ssh-keygen -q -t ecdsa -b 384 -N "" -f "$OUT/supernode-$i" <<< y >/dev/null
done
# the server signs every fused version with this Ed25519 key; users pull with --trust version-signing.pub
openssl genpkey -algorithm ed25519 -out "$OUT/version-signing.key"
openssl pkey -in "$OUT/version-signing.key" -pubout -out "$OUT/version-signing.pub"
echo "certificates, SuperNode keys and the version-signing key pair in $OUT (register each supernode-N.pub with: flwr supernode register)"
