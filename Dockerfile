# kafscribe services image (used by docker-compose.kafka.yml). CPU by default;
# for CUDA, start from an nvidia/cuda base and set KAFSCRIBE_DEVICE=cuda.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends ffmpeg && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -e ".[models]" && kafscribe models prepare
ENV KAFSCRIBE_HTTP_HOST=0.0.0.0
ENTRYPOINT ["kafscribe"]
