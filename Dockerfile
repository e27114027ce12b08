# sae-server image (CPU backend). Build:   docker build -t sae-server .
# Run the demo:  docker run --rm -p 50051:50051 -p 9090:9090 sae-server
# Real model:    docker run --rm -v /models:/models -p 50051:50051 sae-server \
#                  --config=/models/server.textproto
# For the CUDA backend build FROM an image that has the CUDA toolkit in
# /usr/local/cuda (set BASE_IMAGE / RUNTIME_IMAGE); CMake enables CUDA when
# nvcc is present.
ARG BASE_IMAGE=debian:12
ARG RUNTIME_IMAGE=debian:12-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY deploy/install_deps.sh deploy/install_deps.sh
RUN bash deploy/install_deps.sh
COPY . .
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSAE_BUILD_TESTS=OFF \
 && cmake --build /build --target sae-server sae-client sae-extract sae-make-demo \
 && mkdir -p /out \
 && find /build -maxdepth 3 -type f \( -name 'sae-*' -o -name 'libsae_cuda*.so' \) -perm -u+x -exec cp {} /out/ \;

FROM ${RUNTIME_IMAGE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libgrpc++1.51 libprotobuf32 libabsl20220623 libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 \
      libpcre2-8-0 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
RUN useradd --system --create-home sae
USER sae
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/sae-server"]
CMD ["--demo", "--demo_dir=/home/sae/demo", "--listen=0.0.0.0:50051", "--metrics_listen=0.0.0.0:9090"]
