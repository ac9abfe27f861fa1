# kafscribe services image (used by docker-compose.kafka.yml), two targets:
#   cpu (the default, last stage): python:3.11-slim
#   gpu: an NVIDIA CUDA 12 + cuDNN 9 runtime (what CTranslate2 4.x and torch's CUDA wheels use), with
#        KAFSCRIBE_DEVICE=auto: `cuda` when the driver shows a GPU (the host needs the NVIDIA driver and
#        the NVIDIA Container Toolkit), else CPU. `--profile gpu` of the compose file builds and runs it.
# Build args choose the base images: --build-arg CUDA_IMAGE=nvidia/cuda:<tag> for another CUDA 12 release.
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ffmpeg ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -e ".[models]" && kafscribe models prepare
ENV KAFSCRIBE_HTTP_HOST=0.0.0.0 KAFSCRIBE_DEVICE=auto
ENTRYPOINT ["kafscribe"]

FROM ${PYTHON_IMAGE} AS cpu
RUN apt-get update && apt-get install -y --no-install-recommends ffmpeg && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -e ".[models]" && kafscribe models prepare
ENV KAFSCRIBE_HTTP_HOST=0.0.0.0
ENTRYPOINT ["kafscribe"]
