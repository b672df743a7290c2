# syntax=docker/dockerfile:1
# elasticserve's OpenAI-compatible server.
#   docker build -t elasticserve .                                 (CPU, the default)
#   docker build --build-arg DEVICE=cu128 -t elasticserve:cu128 .  (torch's CUDA 12.8 wheel)
#   docker run -p 8000:8000 -e ELASTICSERVE_ADMIN_TOKEN=... elasticserve --model a=/models/a
# deploy/compose.yaml serves two models with it.
ARG PYTHON=3.11
FROM python:${PYTHON}-slim

# DEVICE picks torch's wheel index: cpu, or a CUDA tag (cu126, cu128, ...). The CUDA wheels carry
# their own CUDA libraries, so the same slim base works on a GPU host (with the NVIDIA container
# toolkit); the engine itself runs its models on the CPU today.
ARG DEVICE=cpu
ARG TORCH=2.13.0

# cc builds the native decode kernel on first use (--attention-backend auto falls back to torch
# without a compiler, at a cost in decode speed)
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# The project pins torch to the CPU wheel (see the Makefile and pyproject.toml): it is not a
# dependency of the package, as a bare `pip install torch` from PyPI pulls GBs of CUDA packages.
RUN pip install --no-cache-dir torch==${TORCH} --index-url https://download.pytorch.org/whl/${DEVICE}

WORKDIR /src
COPY pyproject.toml ./
COPY elasticserve ./elasticserve
RUN pip install --no-cache-dir ".[server]" && rm -rf /src

# not root; /models and /data belong to the server's user, so named volumes mounted there
# start writable (Docker copies the ownership of the image's directory into a new volume)
RUN useradd --create-home --uid 1000 elasticserve \
    && mkdir -p /models /data && chown elasticserve:elasticserve /models /data
USER elasticserve
WORKDIR /data
# no model downloads: models are made with `elasticserve make-model` or mounted; the native
# kernel's build cache stays in the container
ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false ELASTICSERVE_CACHE=/data/.cache \
    PYTHONUNBUFFERED=1

EXPOSE 8000
# asks the default port: a server started with another --port needs its own healthcheck. The
# start period covers the first start without --model, which trains the demo model (<= 60 s)
HEALTHCHECK --interval=10s --timeout=5s --start-period=150s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# arguments of `docker run IMAGE ...` are `elasticserve serve` options (--model, --memory, ...);
# the admin token comes from $ELASTICSERVE_ADMIN_TOKEN, never from the command line
ENTRYPOINT ["elasticserve", "serve", "--host", "0.0.0.0"]
