#!/usr/bin/env bash
# Parse docker-compose.yml with docker-compose itself (1.29.2, Debian's docker-compose, installed into
# .venv-compose from the package index), as far as a machine without a Docker engine allows:
#   1. `docker-compose config` accepts the file when MINIO_ROOT_PASSWORD is set;
#   2. it refuses it, naming the variable, when MINIO_ROOT_PASSWORD is not set (no default credentials).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MIXSHOW_COMPOSE_VENV:-.venv-compose}
if [ ! -x "$VENV/bin/docker-compose" ]; then
  python3 -m venv "$VENV"
  # PyYAML 5.4 (docker-compose 1.29 needs < 6) builds only with Cython < 3 and no build isolation
  "$VENV/bin/pip" install -q "cython<3.0.0" wheel
  "$VENV/bin/pip" install -q --no-build-isolation "pyyaml==5.4.1"
  "$VENV/bin/pip" install -q "docker-compose==1.29.2"
fi
MINIO_ROOT_PASSWORD=check-only-secret "$VENV/bin/docker-compose" -f docker-compose.yml config -q
echo "docker-compose $("$VENV/bin/docker-compose" version --short): docker-compose.yml parses"
if out=$(env -u MINIO_ROOT_PASSWORD "$VENV/bin/docker-compose" -f docker-compose.yml config -q 2>&1); then
  echo "docker-compose.yml parses without MINIO_ROOT_PASSWORD: it must not have a default password" >&2
  exit 1
fi
grep -q "MINIO_ROOT_PASSWORD" <<< "$out" || { echo "unexpected refusal: $out" >&2; exit 1; }
echo "without MINIO_ROOT_PASSWORD it is refused: ${out##*: }"
