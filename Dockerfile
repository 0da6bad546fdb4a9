# Multi-stage build: compile in the Rust image, run as a non-root user in a slim Debian.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin tokengate

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/tokengate --create-home tokengate
COPY --from=build /src/target/release/tokengate /usr/local/bin/tokengate
USER tokengate
WORKDIR /var/lib/tokengate
ENV TOKENGATE__SERVER__LISTEN=0.0.0.0:8080 \
    TOKENGATE__STORAGE__DATA_DIR=/var/lib/tokengate/data
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tokengate"]
CMD ["serve"]
