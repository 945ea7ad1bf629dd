#!/usr/bin/env bash
# The guide's migration manager entry point, from any working directory:
#   migrate.sh up postgres      apply pending schema files (unified-memory schema up)
#   migrate.sh down postgres    undo the newest schema file (unified-memory schema down)
#   migrate.sh status postgres  list applied and pending files
#   migrate.sh up milvus        create the unified Milvus collection (unified-memory vectors up)
# Connection settings as for unified-memory: DATABASE_URL or POSTGRES_*, MILVUS_URI or MILVUS_HOST/PORT.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
if [[ -x "$repo/.venv/bin/unified-memory" ]]; then tool=("$repo/.venv/bin/unified-memory")
elif command -v unified-memory >/dev/null; then tool=(unified-memory)
else echo "unified-memory is not installed: run 'make install' in $repo" >&2; exit 2; fi
action="${1:-}"; target="${2:-postgres}"; shift $(( $# < 2 ? $# : 2 ))
case "$action/$target" in
  up/postgres) exec "${tool[@]}" schema up "$@" ;;
  down/postgres) exec "${tool[@]}" schema down "$@" ;;
  status/postgres) exec "${tool[@]}" schema status "$@" ;;
  up/milvus) exec "${tool[@]}" vectors up "$@" ;;
  *) echo "usage: migrate.sh up|down|status postgres | up milvus" >&2; exit 2 ;;
esac
