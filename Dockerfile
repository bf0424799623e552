# sprintlink container image.
#
#   docker build -t sprintlink:local .
#   docker run --rm -p 8080:8080 -v sprintlink-data:/data \
#     -v "$PWD/sprintlink.toml:/etc/sprintlink/sprintlink.toml:ro" sprintlink:local
#
# See deploy/README.md for Compose and Kubernetes.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

########################################################################
# Builder: compiles the release binary.
########################################################################
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder

# The slim Rust image already has gcc and libc6-dev, which is all that
# aws-lc-sys (rustls' crypto), ring and the bundled SQLite need on
# x86_64/aarch64 glibc. cmake, g++ and make cover aws-lc-sys' CMake fallback
# on other targets. This stage is thrown away, so versions are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake g++ make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# 1. Dependency layer: build every dependency against placeholder sources, so
#    that editing the crate's own code does not rebuild the ~300 dependencies.
#    Every target Cargo.toml declares needs a placeholder (the [[bench]] too).
#    This layer is rebuilt only when Cargo.toml or Cargo.lock changes.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && echo 'fn main() {}' > benches/throughput.rs \
 && cargo build --release --locked \
 && rm -rf src benches \
    target/release/sprintlink target/release/sprintlink.d \
    target/release/deps/sprintlink-* target/release/deps/libsprintlink-* \
    target/release/.fingerprint/sprintlink-*

# 2. The real sources (.dockerignore keeps target/, .git/ and deploy files
#    out). COPY keeps the files' old mtimes, so touch the crate roots to make
#    sure cargo rebuilds the crate instead of reusing the placeholder.
COPY . .
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && ./target/release/sprintlink --help > /dev/null

########################################################################
# Runtime: Debian slim + CA certificates + the binary, as a non-root user.
########################################################################
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="sprintlink" \
      org.opencontainers.image.description="Signed webhooks in, SprintHub custom-object links out, durably." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="https://example.invalid/sprintlink" \
      org.opencontainers.image.documentation="https://example.invalid/sprintlink/deploy/README.md" \
      org.opencontainers.image.base.name="docker.io/library/debian:${DEBIAN_RELEASE}-slim"

# ca-certificates: SprintHub is called over HTTPS (rustls reads the system
# roots). The version follows the Debian point release the base image is
# built from; pinning it would break the build at every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 sprintlink \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin sprintlink \
 && install -d -o 10001 -g 10001 -m 0750 /data \
 && install -d -m 0755 /etc/sprintlink

# A minimal default configuration (SQLite in /data, secrets from the
# environment). Mount your own file over it, or override single values with
# SPRINTLINK_SECTION__KEY environment variables.
COPY deploy/docker/sprintlink.toml /etc/sprintlink/sprintlink.toml
COPY --from=builder /build/target/release/sprintlink /usr/local/bin/sprintlink

ENV SPRINTLINK_CONFIG=/etc/sprintlink/sprintlink.toml \
    RUST_LOG=info

# Numeric UID/GID so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /data

EXPOSE 8080

# sprintlink drains for server.shutdown_timeout_ms (25 s by default) after
# SIGTERM: give `docker stop` / Compose a longer timeout than Docker's 10 s
# (docker run --stop-timeout 30, Compose stop_grace_period: 30s).
STOPSIGNAL SIGTERM

# Exit 0 when /readyz on the configured listen port answers 200.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/sprintlink", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/sprintlink"]
CMD ["serve"]
