# sdg-job on the official vLLM image. One image, two Python environments that both stay consistent:
#  - the image's own (vLLM, CUDA, torch): left as it is. `vllm` stays on PATH and the job starts vLLM from there
#    (`serve.vllm_command`, default `vllm serve`, looked up on PATH);
#  - /opt/sdg-job/venv: sdg-job with Data Designer and Ray, first on PATH, so `python3` (the entrypoint, the Ray
#    workers) is sdg-job's. They cannot share one environment: vLLM 0.33 requires mcp>=2.2,<3, Data Designer 0.9.7
#    requires mcp<2. The build fails if `pip check` finds a conflict in either.
# No NeMo-Run inside: the launcher runs where you submit from and starts `python3 -m sdg_job run` in this image.
#
#   docker build --network host -t sdg-job .
#   docker run --rm --network host --user "$(id -u):$(id -g)" -e OPENAI_BASE_URL -e OPENAI_API_KEY \
#     -v "$PWD/out:/out" sdg-job recipe=tiny provider=openai                       # any OpenAI-compatible endpoint
#   docker run --rm --network host --gpus all --ipc=host --user "$(id -u):$(id -g)" -e HF_HOME=/hf \
#     -e HF_HUB_OFFLINE=1 -v /shared/hf:/hf -v "$PWD/out:/out" sdg-job recipe=default    # serves vLLM itself
# (More in README.md, "Docker"; tests/test_docker.py runs all but the GPU one.)
#
# The base, pinned by tag. Pin its digest too once you have resolved it (`docker buildx imagetools inspect
# vllm/vllm-openai:v0.33.0`): --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.33.0@sha256:<digest>. The tests build on a
# local stand-in (scripts/vllm-standin-image.sh) whose own environment also needs mcp 2.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${VLLM_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/sdg-job
COPY pyproject.toml README.md ./
COPY sdg_job ./sdg_job
# `python3` here is still the image's own. The venv is made from it but sees none of its packages.
RUN python3 -m venv /opt/sdg-job/venv \
 && /opt/sdg-job/venv/bin/python -m pip install --no-cache-dir . \
 && echo "pip check, sdg-job's environment:" && /opt/sdg-job/venv/bin/python -m pip check \
 && echo "pip check, the image's own environment ($(command -v python3)):" && python3 -m pip check
COPY recipes ./recipes
COPY seeds ./seeds

# HF_HOME: where vLLM finds (or downloads) weights; mount staged weights there and set HF_HUB_OFFLINE=1 on nodes
# without internet. HOME is writable by any uid (`docker run --user`), for the caches vLLM, Ray and torch keep there.
ENV PATH=/opt/sdg-job/venv/bin:$PATH \
    SDG_RECIPES_DIR=/opt/sdg-job/recipes \
    NEMO_TELEMETRY_ENABLED=false \
    NEMO_RUN_DIR=/out \
    HOME=/home/sdg \
    HF_HOME=/home/sdg/.cache/huggingface \
    HF_HUB_OFFLINE=0
RUN mkdir -p /out "$HF_HOME" \
 && chmod 1777 /out /home/sdg /home/sdg/.cache "$HF_HOME" \
 && python3 -m sdg_job validate recipe=default > /dev/null \
 && vllm="$(command -v vllm || true)" \
 && if [ -z "$vllm" ] || [ "${vllm#/opt/sdg-job/}" != "$vllm" ]; then \
      echo "error: no vllm on PATH from the base image's own environment" >&2; exit 1; \
    fi \
 && echo "serve.vllm_command starts $vllm; python3 is $(command -v python3)" \
 && echo "export PATH=\"$PATH\"" > /etc/profile.d/00-image-path.sh
# enroot (pyxis) starts every container through a login shell, and a login shell's /etc/profile resets PATH on
# Debian-based images (found on the test cluster: `python3` was the system's, without sdg-job). profile.d runs after
# that reset and puts the image's PATH back: sdg-job's venv first, then the base image's own (its `vllm`).

# Not root. Run with --user "$(id -u):$(id -g)" so the files in the mounted /out are yours.
USER 1000:1000
# Output lands in $SDG_OUTPUT_DIR, else $NEMO_RUN_DIR/sdg: /out/sdg here, /nemo_run/sdg under NeMo-Run.
VOLUME ["/out"]
ENTRYPOINT ["python3", "-m", "sdg_job", "run"]
CMD ["recipe=default"]
