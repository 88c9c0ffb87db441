# Postgres discovery shared by scripts/dev and scripts/test. Source it, then call ensure_postgres;
# it exports DATABASE_URL pointing at a server that answers, in this order:
#   1. DATABASE_URL if already set;
#   2. a server on 127.0.0.1:5432 (trust auth, user postgres);
#   3. a throwaway cluster under target/postgres on port 55432, installing Debian's postgresql
#      package first when its binaries are missing.

PG_THROWAWAY_PORT="${PG_THROWAWAY_PORT:-55432}"

pg_log() { printf '[postgres] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

pg_bin_dir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

install_postgres() {
  if [ "$(id -u)" != 0 ]; then
    pg_log "PostgreSQL is not installed and this is not root: install the 'postgresql' package, or set DATABASE_URL"
    return 1
  fi
  pg_log "installing Debian's postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q postgresql >/dev/null 2>&1 || {
    apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null
  }
}

start_throwaway_cluster() {
  local root="$1" bin data sockets
  bin=$(pg_bin_dir) || { install_postgres && bin=$(pg_bin_dir); } || return 1
  data="$root/target/postgres/data"
  sockets="$root/target/postgres/run"
  mkdir -p "$data" "$sockets"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    chown -R postgres "$root/target/postgres"
    # The postgres user must be able to reach the data directory.
    if ! runuser -u postgres -- test -w "$data"; then
      data=$(mktemp -d /tmp/orchestrator-pg.XXXXXX)/data
      sockets=$(dirname "$data")/run
      mkdir -p "$data" "$sockets"
      chown -R postgres "$(dirname "$data")"
      pg_log "target/ is not reachable by the postgres user; using $(dirname "$data")"
    fi
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    pg_log "initialising a throwaway cluster in $data"
    as_postgres "$bin/initdb" -D "$data" -U postgres --auth=trust --no-sync >/dev/null
  fi
  if ! port_open 127.0.0.1 "$PG_THROWAWAY_PORT"; then
    pg_log "starting it on 127.0.0.1:$PG_THROWAWAY_PORT"
    as_postgres "$bin/pg_ctl" -D "$data" -l "$data/../postgres.log" -w -t 60 \
      -o "-p $PG_THROWAWAY_PORT -k $sockets -c listen_addresses=127.0.0.1 -c max_connections=400 -c fsync=off" start >/dev/null
  fi
  export PG_THROWAWAY_DATA="$data"
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_THROWAWAY_PORT/postgres"
}

ensure_postgres() {
  local root="$1"
  if [ -n "${DATABASE_URL:-}" ]; then
    pg_log "using DATABASE_URL from the environment"
    return 0
  fi
  if port_open 127.0.0.1 5432; then
    export DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
    pg_log "using the server on 127.0.0.1:5432"
    return 0
  fi
  start_throwaway_cluster "$root"
}

# The psql client, from PATH or the server package.
psql_bin() {
  command -v psql 2>/dev/null || { local bin; bin=$(pg_bin_dir) && echo "$bin/psql"; }
}

# Creates database $2 on the server of URL $1 unless it exists.
ensure_database() {
  local url="$1" name="$2" psql
  psql=$(psql_bin) || { pg_log "no psql client; assuming database $name exists"; return 0; }
  if ! "$psql" "$url" -tAc "SELECT 1 FROM pg_database WHERE datname = '$name'" | grep -q 1; then
    "$psql" "$url" -qc "CREATE DATABASE \"$name\"" >/dev/null
  fi
}
