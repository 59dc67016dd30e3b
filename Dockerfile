# Multi-stage build: compile in the Rust image, run from a slim Debian with only the binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY lua ./lua
RUN cargo build --release --locked && strip target/release/flashgate

FROM debian:bookworm-slim
RUN useradd --system --no-create-home --uid 10001 flashgate
COPY --from=build /src/target/release/flashgate /usr/local/bin/flashgate
COPY config/flashgate.yaml /etc/flashgate/flashgate.yaml
USER flashgate
# 8080: the proxy; 9090: the admin API (keep it off the public network).
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["flashgate", "health", "--url", "http://127.0.0.1:8080/healthz"]
# Mount your own config over /etc/flashgate/flashgate.yaml (its upstream must point at your
# backend); --listen makes the example reachable from outside the container.
ENTRYPOINT ["flashgate"]
CMD ["serve", "--config", "/etc/flashgate/flashgate.yaml", "--listen", "0.0.0.0:8080"]
