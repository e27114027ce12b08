# Two images from this file (BuildKit, the default builder since Docker 23,
# builds only the stages a target needs):
#
#   docker build -t sae-server .                  CPU backend (the default target)
#   docker build --target gpu -t sae-server:gpu . CUDA backend, NVIDIA GPUs sm_80 / sm_90
#
# Run the demo:  docker run --rm -p 50051:50051 -p 9464:9464 sae-server
#                docker run --rm --gpus all -p 50051:50051 -p 9464:9464 sae-server:gpu
# Real model:    docker run --rm --gpus all -v /models:/models -p 50051:50051 sae-server:gpu \
#                  --config=/models/server.textproto
#
# Both build on Debian 12 with Debian's packages. The GPU image takes only the
# CUDA toolkit (/usr/local/cuda: nvcc, cudart, cuBLAS) from NVIDIA's devel
# image; its runtime stage carries cuBLAS next to libsae_cuda.so, and the
# driver's libcuda.so.1 comes from the host through the NVIDIA container
# runtime. deploy/stage_runtime.sh decides what each image holds: the binaries,
# those libraries, and the list of Debian packages the runtime stage installs.
ARG DEBIAN_IMAGE=debian:12
ARG RUNTIME_IMAGE=debian:12-slim
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
ARG CUDA_ARCHITECTURES=80;90

FROM ${CUDA_DEVEL_IMAGE} AS cuda-toolkit

FROM ${DEBIAN_IMAGE} AS deps
WORKDIR /src
COPY deploy/install_deps.sh deploy/install_deps.sh
RUN bash deploy/install_deps.sh

FROM deps AS build-gpu
ARG CUDA_ARCHITECTURES
# There /usr/local/cuda is a link through /etc/alternatives to cuda-X.Y; take
# the folder itself and link it here (COPY's handling of links has varied).
COPY --from=cuda-toolkit /usr/local/ /opt/nvidia/
RUN toolkit=$(ls -d /opt/nvidia/cuda-[0-9]*.[0-9]* | sort -V | tail -n 1) \
 && ln -s "$toolkit" /usr/local/cuda && /usr/local/cuda/bin/nvcc --version
COPY . .
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSAE_BUILD_TESTS=OFF \
      -DSAE_ENABLE_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" \
 && cmake --build /build --target sae-server sae-client sae-extract sae-make-demo sae_cuda \
 && bash deploy/stage_runtime.sh --cuda /build /out

FROM deps AS build-cpu
COPY . .
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSAE_BUILD_TESTS=OFF -DSAE_ENABLE_CUDA=OFF \
 && cmake --build /build --target sae-server sae-client sae-extract sae-make-demo \
 && bash deploy/stage_runtime.sh /build /out

# What both runtime images share; each adds its staged tree and packages.
FROM ${RUNTIME_IMAGE} AS runtime
RUN useradd --system --create-home sae
ENV PATH=/opt/sae/bin:$PATH
EXPOSE 50051 9464
# grpc.health.v1 on the default port: SERVING once the model is loaded and warm.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m CMD ["/opt/sae/bin/sae-client", "--addr", "127.0.0.1:50051", "--timeout", "4", "health"]
ENTRYPOINT ["/opt/sae/bin/sae-server"]

FROM runtime AS gpu
COPY --from=build-gpu /out/ /opt/sae/
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      ca-certificates $(cat /opt/sae/debian-packages) && rm -rf /var/lib/apt/lists/*
# For the NVIDIA container runtime: mount the GPUs and the driver's compute
# libraries, and refuse to start on a driver older than CUDA 13 (r580).
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility NVIDIA_REQUIRE_CUDA="cuda>=13.0"
USER sae
CMD ["--demo", "--demo_dir=/home/sae/demo", "--backend=cuda", "--listen=0.0.0.0:50051", "--metrics_listen=0.0.0.0:9464"]

FROM runtime AS cpu
COPY --from=build-cpu /out/ /opt/sae/
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      ca-certificates $(cat /opt/sae/debian-packages) && rm -rf /var/lib/apt/lists/*
USER sae
CMD ["--demo", "--demo_dir=/home/sae/demo", "--listen=0.0.0.0:50051", "--metrics_listen=0.0.0.0:9464"]
