"""A shard's summary: what the worker that committed a shard says of it, and all that the driver, the manifest, the
card and the endpoint watch read of it. One typed, versioned model crosses both boundaries a shard's report crosses:
from the worker to the driver through Ray, and through the run dir, where RunStore writes it (shard-NNNNN.json, once)
and reads it back (a retry, a resume). The file's keys are the fields' names: a run dir of an earlier version resumes,
and an earlier version reads these (it ignores `version`)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from sdg_job.card import Columns

SUMMARY_VERSION = 1  # 0: the untyped dict earlier versions wrote, without a `version` key; 1: this model
# Left out of the manifest's shard entries: the version is the file's business; column types are the card's.
NOT_IN_MANIFEST = {"version", "columns", "sampled"}


class ShardSummary(BaseModel):
    """Counts, tokens, timings and errors of one committed shard. Fields every version wrote are required; those
    added since have defaults, for a shard committed before them."""

    model_config = ConfigDict(frozen=True)  # a committed shard never changes

    version: int = SUMMARY_VERSION
    shard: str  # its id, shard-NNNNN
    requested: int  # rows asked of Data Designer
    generated: int  # rows it returned
    valid: int  # records kept after projection and filters
    dropped: dict[str, int]  # records lost, by reason
    input_tokens: int
    output_tokens: int
    usage: dict[str, dict[str, int]] = {}  # per model alias: requests answered, tokens
    seconds: float  # wall time of the shard
    cpu_s: float = 0.0  # the worker process's CPU, all its threads
    engine_load_cpu_s: float = 0.0  # importing Data Designer: once per worker process
    retries: int  # the attempt that committed it (0: the first)
    random_seed: int
    endpoint: str  # the node's (first) own server, else the first endpoint, no userinfo; "" with no model
    endpoints: dict[str, str] = {}  # each model alias's endpoint
    worker: str  # host:pid
    node_id: str | None = None  # the Ray node it ran on
    error: str | None  # Data Designer's, if the shard's generation failed
    request_errors: dict[str, int] = {}  # failed requests by cause (a row may have several)
    request_error: str | None = None  # the provider's words for the most frequent cause, keys redacted
    request_error_provider: str | None = None  # and which provider said them
    columns: Columns | None = None  # each column's type over its records, for the card; None: not found
    contaminated: dict[str, int] = {}  # records dropped as contaminated, by evaluation file
    sampled: dict[str, dict[str, Any]] = {}  # each sampler's values over the rows generated (sdg_job.diversity)
    files: str = ""  # the stem of this attempt's .jsonl/.digests/.tokens: set by RunStore.commit

    @classmethod
    def from_json(cls, text: str) -> ShardSummary:
        """A summary as a shard file holds it; one without `version` is an earlier version's untyped dict."""
        data = json.loads(text)
        data.setdefault("version", 0)
        return cls.model_validate(data)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1) + "\n"

    def manifest_entry(self) -> dict[str, Any]:
        """The shard as the manifest lists it: what its file recorded (a shard of an earlier version shows only the
        fields it had), without the version and the column types."""
        return self.model_dump(mode="json", exclude_unset=True, exclude=NOT_IN_MANIFEST)
