# sdg-job on the official vLLM image: vLLM + CUDA inside, sdg-job with Data Designer and Ray on top.
# NeMo-Run is not in it: the launcher runs where you submit from and starts `python3 -m sdg_job` in this image.
#   docker build -t sdg-job .
#   docker run --rm -e OPENAI_BASE_URL -e OPENAI_API_KEY -v $PWD/out:/out sdg-job recipe=default provider=openai
#   docker run --rm --gpus all --ipc=host -v $PWD/out:/out sdg-job recipe=default          # serves vLLM itself
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${VLLM_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    NEMO_TELEMETRY_ENABLED=false \
    SDG_RECIPES_DIR=/opt/sdg-job/recipes \
    NEMO_RUN_DIR=/out

WORKDIR /opt/sdg-job
COPY pyproject.toml README.md ./
COPY sdg_job ./sdg_job
COPY scripts ./scripts
COPY recipes ./recipes
COPY seeds ./seeds
RUN python3 -m pip install --no-cache-dir -e . \
 && python3 -m sdg_job validate recipe=default > /dev/null

# Output lands in $SDG_OUTPUT_DIR, else $NEMO_RUN_DIR/sdg: /out/sdg here, /nemo_run/sdg under NeMo-Run.
VOLUME ["/out"]
ENTRYPOINT ["python3", "-m", "sdg_job", "run"]
CMD ["recipe=default"]
