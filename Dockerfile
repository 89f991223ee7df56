# The one `rampart` binary (CA, agent, proxy, inject, ...) on a distroless runtime.
#
#   docker build -t ghcr.io/rampart-mesh/rampart:0.1.0 .
#
# Not built in Rampart's development environment (it cannot build images); CI or a release
# machine builds it. The manifests in deploy/kubernetes/ and `rampart inject` expect the
# entrypoint to be `rampart` and the binary on PATH (exec probes run `rampart probe`).

# ---- build ----
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Everything the workspace needs (see .dockerignore for what is left out). protox compiles the
# .proto files in Rust: no protoc. ring needs a C compiler, which this image has.
COPY . .
RUN cargo build --release --locked --bin rampart \
 && install -D -m 0755 target/release/rampart /out/rampart

# ---- run ----
# distroless/cc: glibc and libgcc for the Rust binary, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/rampart /usr/local/bin/rampart
# 65532 (distroless "nonroot"); the injected sidecars override it with 1337, Istio's proxy uid.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/rampart"]
CMD ["--help"]
