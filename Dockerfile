# syntax=docker/dockerfile:1.7
# One image for every smsflow process: smsflow-ingress, smsflow-worker (run, migrate,
# replay-dead-letters) and the Plivo simulator smsflow-plivo-sim. Queries compile from the
# committed .sqlx/ data: no database needed.

FROM rust:1.95-bookworm AS build
WORKDIR /src
ENV SQLX_OFFLINE=true CARGO_TERM_COLOR=never
COPY . .
# Cache mounts keep the registry and compiled dependencies between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p smsflow-ingress -p smsflow-worker -p smsflow-plivo-sim --bins \
 && mkdir -p /out \
 && cp target/release/smsflow-ingress target/release/smsflow-worker target/release/smsflow-plivo-sim /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin smsflow
COPY --from=build /out/ /usr/local/bin/
USER 10001
ENV SMSFLOW_TELEMETRY__LOG_FORMAT=json
EXPOSE 8080 9090
# For the default command (the ingress). The image carries no HTTP client: bash's /dev/tcp asks
# /readyz. Override per service (the worker's admin port is 9090).
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && head -1 <&3 | grep -q ' 200 '"]
CMD ["smsflow-ingress"]
