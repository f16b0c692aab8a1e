# One image per Haishin service, from one build of the workspace:
#
#   docker build --build-arg SERVICE=trigger -t trigger .
#
# SERVICE is one of trigger, list-uploader, sender, completion. The build stage compiles all
# four binaries and does not depend on SERVICE, so building the four images one after another
# compiles the workspace once and takes the rest from the layer cache.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Queries are checked at run time (sqlx::query, not its compile-time macros), so the build needs
# no database.
ENV CARGO_INCREMENTAL=0 \
    CARGO_TERM_COLOR=never
COPY . .
RUN cargo build --release --locked \
        -p haishin-trigger -p haishin-list-uploader -p haishin-sender -p haishin-completion \
 && mkdir /out \
 && cp target/release/trigger target/release/list-uploader target/release/sender \
       target/release/completion /out/

FROM build AS select
ARG SERVICE
RUN case "${SERVICE}" in \
      trigger|list-uploader|sender|completion) cp "/out/${SERVICE}" /service ;; \
      *) echo "SERVICE must be trigger, list-uploader, sender or completion, not '${SERVICE}'" >&2; exit 1 ;; \
    esac

# glibc and libgcc from Debian 12, like the build stage; CA certificates; no shell.
#checkov:skip=CKV_DOCKER_2:Cloud Run ignores HEALTHCHECK and probes the container's port itself; the image has no shell or client to run one.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG SERVICE
LABEL org.opencontainers.image.title="haishin-${SERVICE}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=select /service /usr/local/bin/haishin
USER 65532:65532
ENV RUST_LOG=info
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/haishin"]
