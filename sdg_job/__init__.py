"""sdg-job: YAML recipe → NVIDIA Data Designer on local LLM servers, sharded over Ray → one validated JSONL."""

__version__ = "0.1.0"
