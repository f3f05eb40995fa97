# telme in a container: the paper's recipes on one GPU, the demo and the tests on a CPU.
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t telme .
#   docker run --gpus all -v "$MELD_DIR":/data/MELD.Raw -v "$PWD/runs":/app/runs telme meld
#   docker run --gpus all -v "$IEMOCAP_DIR":/data/IEMOCAP_full_release -v "$PWD/runs":/app/runs telme iemocap
#   docker run telme demo            # synthetic data, tiny models, no data, no GPU needed
#   docker run telme test            # the test suite
# Arguments after the command go to run.sh (e.g. `meld --seeds 5`, `meld --compat official`).
# Data are read from /data (mount it read-only if you like); runs go to /app/runs, the decoded-media
# cache and the Hugging Face downloads to /cache: mount both to keep them between containers.
# Nothing is trained or downloaded at build time.

# torch 2.11.0 (CUDA 13.0 build), as requirements.txt pins it.
FROM pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime

ARG GIT_COMMIT=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TELME_PYTHON=python \
    MELD_DIR=/data/MELD.Raw \
    IEMOCAP_DIR=/data/IEMOCAP_full_release \
    TELME_CACHE=/cache \
    HF_HOME=/cache/huggingface \
    TELME_GIT_COMMIT=${GIT_COMMIT}

# torch.compile (run.sh's recipes, and one test) builds code at run time: inductor's CPU kernels with
# g++, Triton's GPU launcher with gcc. The runtime image ships no compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# A non-root user (uid 10001, clear of the base image's users). runs/ and the cache are writable by
# any uid, so `docker run --user "$(id -u):$(id -g)"` also works and leaves host-owned files.
RUN groupadd --gid 10001 telme \
    && useradd --create-home --uid 10001 --gid 10001 telme \
    && install -d -o 10001 -g 10001 /app /data \
    && install -d -m 1777 /app/runs /cache
WORKDIR /app

COPY requirements.txt ./
RUN python -m pip install --no-cache-dir -r requirements.txt

COPY --chown=10001:10001 telme.py run.sh test_telme.py ./
USER 10001:10001
ENTRYPOINT ["bash", "run.sh"]
CMD ["help"]
