# One image for every CDI component: the multi-call `cdi` binary, linked under upstream's
# entry-point names so pod specs written for upstream (`/usr/bin/cdi-importer`, …) run unchanged.
# No qemu-img in the runtime image: conversion is done in-process by the formats engine.

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin cdi

FROM docker.io/library/debian:bookworm-slim
# ca-certificates: HTTPS sources trust the system roots besides any CA directory they are given.
# util-linux: losetup for the embedded control plane's block storage class.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates util-linux \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/cdi /usr/bin/cdi
RUN for name in importer uploadserver uploadproxy; do ln -s cdi /usr/bin/cdi-$name; done
# Upstream runs its workers as uid 107 (qemu) with fsGroup 107.
USER 107
ENTRYPOINT ["/usr/bin/cdi"]
