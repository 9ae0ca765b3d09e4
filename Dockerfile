# syntax=docker/dockerfile:1
#
# wsfleet container image.
#
#   docker build -t wsfleet:dev .
#   docker run --rm -p 8080:8080 wsfleet:dev            # embedded mode, one process
#   docker run --rm wsfleet:dev serve --help             # every flag and its env var
#
# Two stages: a full Rust toolchain builds the binary, and only the binary plus
# CA roots go into a slim runtime image (no compiler, no shell tooling beyond
# Debian's base, nothing that runs as root).

############################ build ############################
FROM rust:1-bookworm AS builder

WORKDIR /src

# The crate is one member of a workspace (`.` and `loadtest/bench`), and cargo
# must see every member's manifest (and its sources, for target discovery)
# before it resolves the lock file, so the usual "copy the manifests, build a
# dummy, then copy src/" trick would need stubs for both members. Copying the
# whole (docker-ignored) tree is simpler and always correct; the cache mounts
# below give back most of the speed: the registry and the target directory
# survive between builds, so a code change recompiles only the workspace crates.
COPY . .

# --locked: build exactly what Cargo.lock pins, and fail instead of silently
# resolving newer dependencies. The target dir is a cache mount, which is not
# part of the image, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p wsfleet \
 && install -D -m 0755 target/release/wsfleet /out/wsfleet

############################ runtime ############################
FROM debian:bookworm-slim

# ca-certificates: the webhook sink (--webhook-url) and rediss:// URLs speak
# TLS, and rustls needs the system roots to verify their certificates.
# Not version-pinned on purpose: the CA bundle must track Debian's security
# updates, and a pinned version disappears from the mirror when one lands.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid (10001) so Kubernetes' runAsNonRoot can verify the
# user without reading /etc/passwd, and so it never collides with a uid that
# owns files on the host.
RUN groupadd --system --gid 10001 wsfleet \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin wsfleet

COPY --from=builder /out/wsfleet /usr/local/bin/wsfleet

# OCI image annotations (https://github.com/opencontainers/image-spec).
# The version must match Cargo.toml's (tests/image.rs checks it).
LABEL org.opencontainers.image.title="wsfleet" \
      org.opencontainers.image.description="Kubernetes-native WebSocket connection fleet: one image for serve and controller" \
      org.opencontainers.image.version="0.1.0"

USER 10001:10001

# WebSocket (/ws), the HTTP API (/v1/...), /healthz, /readyz and /metrics all
# share this one port (see --listen).
EXPOSE 8080

# No init shim (tini): wsfleet is PID 1 and handles SIGTERM itself (readyz
# turns 503, connections get `reconnect` + close 1012 spread over the drain
# window, then it exits 0). It spawns no child processes, so there is nothing
# to reap.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/wsfleet"]
CMD ["serve"]
