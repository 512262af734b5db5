#!/usr/bin/env bash
# PostgreSQL and Redis on loopback for the scale-out tests: Debian packages, no Docker, no systemd.
#
# Idempotent: installs what is missing, starts what is not running, creates the test role and
# database. Exports nothing: the tests default to the URLs below (override them with
# CRMSYNC_TEST_PG_URL / CRMSYNC_TEST_REDIS_URL to point at other servers).
#   postgresql+psycopg://crmsync:crmsync@127.0.0.1:5432/crmsync_test
#   redis://127.0.0.1:6379/15
set -euo pipefail

PG_PORT=5432
PG_ROLE=crmsync
PG_PASSWORD=crmsync
PG_DB=crmsync_test
REDIS_PORT=6379
LOG=/tmp/crmsync-services.log

say() { echo "services: $*"; }
fail() { echo "services: $*" >&2; [ -f "$LOG" ] && tail -30 "$LOG" >&2; exit 1; }

as_postgres() {
  # runuser needs no PAM session; su is the fallback on systems without it.
  if command -v runuser >/dev/null 2>&1; then runuser -u postgres -- "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

# -- packages ---------------------------------------------------------------------------------
need=""
[ -n "$(pg_bin)" ] && [ -x "$(pg_bin)/pg_ctl" ] || need="$need postgresql"
command -v redis-server >/dev/null 2>&1 || need="$need redis-server"
if [ -n "$need" ]; then
  [ "$(id -u)" = 0 ] || fail "missing$need and not root: install them or set CRMSYNC_TEST_PG_URL/CRMSYNC_TEST_REDIS_URL"
  say "installing$need"
  # The packages' own service start fails without systemd; policy-rc.d tells them not to try.
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  status=0
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need) >"$LOG" 2>&1 || status=$?
  [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
  [ "$status" = 0 ] || fail "apt-get install$need failed"
fi

# -- PostgreSQL -------------------------------------------------------------------------------
BIN="$(pg_bin)"
if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
  say "PostgreSQL already accepts connections on 127.0.0.1:$PG_PORT"
elif command -v pg_ctlcluster >/dev/null 2>&1; then
  VERSION="$(basename "$(dirname "$BIN")")"
  if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -qx "$VERSION main"; then
    say "creating cluster $VERSION/main"
    pg_createcluster "$VERSION" main -p "$PG_PORT" >>"$LOG" 2>&1 || fail "pg_createcluster failed"
  fi
  say "starting PostgreSQL $VERSION/main"
  pg_ctlcluster "$VERSION" main start >>"$LOG" 2>&1 || fail "pg_ctlcluster start failed"
else
  # No postgresql-common: a private cluster with initdb + pg_ctl as the postgres user.
  DATA="${CRMSYNC_PG_DATA:-/var/tmp/crmsync-pg}"
  mkdir -p "$DATA" /var/run/postgresql && chown postgres "$DATA" /var/run/postgresql
  if [ ! -f "$DATA/PG_VERSION" ]; then
    as_postgres "$BIN/initdb" -D "$DATA" --auth-local=peer --auth-host=scram-sha-256 >>"$LOG" 2>&1 || fail "initdb failed"
  fi
  as_postgres "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k /var/run/postgresql" start >>"$LOG" 2>&1 || fail "pg_ctl start failed"
fi
for _ in $(seq 1 60); do
  "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break
  sleep 0.5
done
"$BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || fail "PostgreSQL did not come up on 127.0.0.1:$PG_PORT"

# Role and database, over the local socket as the superuser (peer authentication).
psql_su() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres "$@"; }
if [ "$(psql_su -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$PG_ROLE'")" != 1 ]; then
  psql_su -c "CREATE ROLE $PG_ROLE LOGIN PASSWORD '$PG_PASSWORD'" >>"$LOG" 2>&1 || fail "CREATE ROLE failed"
fi
if [ "$(psql_su -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]; then
  psql_su -c "CREATE DATABASE $PG_DB OWNER $PG_ROLE" >>"$LOG" 2>&1 || fail "CREATE DATABASE failed"
fi
say "PostgreSQL ready: postgresql+psycopg://$PG_ROLE:***@127.0.0.1:$PG_PORT/$PG_DB"

# -- Redis ------------------------------------------------------------------------------------
if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
  say "Redis already answers on 127.0.0.1:$REDIS_PORT"
else
  # No persistence: the tests' queues and buckets are throwaway.
  redis-server --daemonize yes --port "$REDIS_PORT" --bind 127.0.0.1 --dir /tmp --save "" --appendonly no \
    --logfile /tmp/crmsync-redis.log >>"$LOG" 2>&1 || fail "redis-server failed to start"
  for _ in $(seq 1 40); do
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break
    sleep 0.25
  done
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG || fail "Redis did not come up on 127.0.0.1:$REDIS_PORT"
fi
say "Redis ready: redis://127.0.0.1:$REDIS_PORT/15"
