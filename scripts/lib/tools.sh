# Tools the scripts install when a machine does not have them. Source it, then call the function.

SQLX_CLI_VERSION="0.8.6" # the sqlx of Cargo.lock: prepare's metadata must match the macros'

# Prints the path of a `cargo sqlx` of SQLX_CLI_VERSION, installing it under target/tools first
# when neither PATH nor an earlier install has one. Installed with --locked, Postgres only.
ensure_sqlx_cli() {
  local root="$1" bin
  for bin in "$(command -v cargo-sqlx 2>/dev/null)" "$root/target/tools/bin/cargo-sqlx"; do
    if [ -n "$bin" ] && [ -x "$bin" ] && "$bin" sqlx --version 2>/dev/null | grep -q " $SQLX_CLI_VERSION\$"; then
      echo "$bin"
      return 0
    fi
  done
  echo "[tools] installing sqlx-cli $SQLX_CLI_VERSION into target/tools (once)" >&2
  cargo install sqlx-cli --version "$SQLX_CLI_VERSION" --locked --no-default-features \
    --features postgres,rustls --root "$root/target/tools" >&2 || return 1
  echo "$root/target/tools/bin/cargo-sqlx"
}

# A C compiler: Rust links through `cc`, and mimalloc (the service's allocator) compiles its C
# sources with it. Installs Debian's gcc when missing and this is root; says what to install otherwise.
ensure_c_compiler() {
  command -v cc >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[tools] installing Debian's gcc and libc6-dev (a C compiler)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc libc6-dev >/dev/null 2>&1 || {
      apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc libc6-dev >/dev/null
    }
  fi
  command -v cc >/dev/null 2>&1 || { echo "[tools] no C compiler (cc): install gcc" >&2; return 1; }
}
