# syntax=docker/dockerfile:1
# Build stage: the release binary (SQLite is compiled in; no protoc, no system libraries).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY migrations ./migrations
# Cargo.toml names the benches: the manifest does not parse without them.
COPY benches ./benches
COPY openapi.yaml ./
# The dashboard's page, script and stylesheet are compiled into the binary.
COPY assets ./assets
RUN cargo build --release --locked && strip target/release/modelpress

# Runtime stage: a small image, a non-root user, data on a volume.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin modelpress \
 && mkdir -p /data /keys && chown modelpress /data /keys
COPY --from=build /src/target/release/modelpress /usr/local/bin/modelpress
USER modelpress
ENV MODELPRESS_ADDR=0.0.0.0:8080 \
    MODELPRESS_DATA_DIR=/data \
    MODELPRESS_LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["/usr/local/bin/modelpress"]
CMD ["serve"]
