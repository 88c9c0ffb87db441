# The orchestrator's production image.
#
#   docker build -t ghcr.io/incidentfox/orchestrator:0.1.0 --build-arg VERSION=0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" .
#   docker run --rm --env-file .env ghcr.io/incidentfox/orchestrator:0.1.0 migrate   # apply migrations, exit
#   docker run --rm --env-file .env -p 8070:8070 ghcr.io/incidentfox/orchestrator:0.1.0   # serve (default)
#
# Linted by hadolint in scripts/check-deploy; CI has no container engine, so it is never built there.

# ---- build -------------------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Compile-time checked queries read the committed offline data (.sqlx/), never a database.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never

# 1. Dependencies only, cached until a manifest or the lock file changes: the workspace manifests
#    with stub sources for both members, built once.
COPY Cargo.toml Cargo.lock ./
COPY devstack/Cargo.toml devstack/Cargo.toml
RUN mkdir -p src devstack/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs devstack/src/lib.rs \
    && echo 'fn main() {}' > devstack/src/main.rs \
    && cargo build --release --locked -p orchestrator --bin orchestrator \
    && rm -rf src target/release/orchestrator* target/release/deps/orchestrator-* \
       target/release/deps/liborchestrator-* target/release/.fingerprint/orchestrator-*

# 2. The service itself. Migrations are embedded at compile time (sqlx::migrate!; build.rs
#    rebuilds when one is added) and queries are checked against .sqlx/, so all are copied first. devstack keeps its stubs: the
#    production binary does not depend on it.
COPY build.rs ./
COPY migrations ./migrations
COPY .sqlx ./.sqlx
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked -p orchestrator --bin orchestrator \
    && install -D -m 0755 target/release/orchestrator /out/orchestrator

# ---- runtime -----------------------------------------------------------------------------------
# Distroless: glibc, libgcc, CA certificates (rustls verifies the neighbours' TLS against them) and
# nothing else, no shell. The `nonroot` variant runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="orchestrator" \
      org.opencontainers.image.description="Control plane of a multi-tenant AI SRE platform: durable team provisioning, verified webhook ingress, agent-run proxy, audit." \
      org.opencontainers.image.source="https://github.com/incidentfox/orchestrator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="IncidentFox"

COPY --from=build /out/orchestrator /usr/local/bin/orchestrator

# Numeric, so Kubernetes can verify runAsNonRoot. Nothing is written to the image at run time: the
# root filesystem can be mounted read-only (the chart mounts an emptyDir on /tmp only).
USER 65532:65532
ENV ORCHESTRATOR_LISTEN_ADDR=0.0.0.0:8070 \
    LOG_FORMAT=json
EXPOSE 8070

# The binary checks itself: `healthcheck` GETs http://127.0.0.1:<port of ORCHESTRATOR_LISTEN_ADDR>/health.
# (Kubernetes ignores HEALTHCHECK and uses the chart's probes on /health and /ready.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/orchestrator", "healthcheck"]

# Entry points: `serve` (the default) and `migrate`; also `check-config` and `healthcheck`.
ENTRYPOINT ["/usr/local/bin/orchestrator"]
CMD ["serve"]
