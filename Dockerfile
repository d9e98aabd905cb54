# syntax=docker/dockerfile:1
# agentd: a static-enough Rust binary on a distroless base, running as a non-root user with a read-only root
# filesystem. Build: docker build -t agentd .   Run: docker run -p 8090:8090 -v agentd-data:/data agentd

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src

# Dependencies first, against stub sources: this layer is rebuilt only when a manifest or the lock file changes.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY crates/agentd/Cargo.toml crates/agentd/build.rs crates/agentd/
COPY bench/Cargo.toml bench/
COPY proto proto
COPY migrations migrations
RUN mkdir -p crates/agentd/src bench/src /out/data \
    && echo 'fn main() {}' > crates/agentd/src/main.rs \
    && touch crates/agentd/src/lib.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && touch bench/src/lib.rs \
    && cargo build --release --locked -p agentd \
    && rm -rf crates/agentd/src

# Then the sources (the benchmark crate stays a stub: only agentd is built).
COPY crates/agentd/src crates/agentd/src
RUN touch crates/agentd/src/main.rs crates/agentd/src/lib.rs \
    && cargo build --release --locked -p agentd \
    && cp target/release/agentd /out/agentd

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/agentd /usr/local/bin/agentd
# The SQLite store lives on a volume (the root filesystem may be read-only); PostgreSQL is set with DATABASE_URL.
COPY --from=build --chown=65532:65532 /out/data /data
ENV HTTP_ADDR=0.0.0.0:8090 \
    INTERNAL_GRPC_HOST=0.0.0.0 \
    DATABASE_URL=sqlite:///data/agentd.db \
    LOG_FORMAT=json
VOLUME ["/data"]
USER 65532:65532
EXPOSE 8090 50061
# agentd is PID 1 (exec form, no shell): SIGTERM reaches it directly and starts its shutdown sequence.
STOPSIGNAL SIGTERM
ENTRYPOINT ["agentd"]
CMD ["serve"]
