"""Output projections: a generated row → one training record, validated. One registry, one function each.

A row that cannot become a valid record raises `InvalidRecord(reason)`; callers drop it and count the reason.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import jsonschema

from sdg_job.config import (
    DPOPreferenceProjection,
    Filter,
    LLMJudgeColumn,
    LLMStructuredColumn,
    LLMTextColumn,
    MessageSpec,
    OpenAIMessagesProjection,
    Projection,
    Recipe,
    StructuredMessagesProjection,
    ToolDataChecks,
)
from sdg_job.generate import TRUNCATED


class InvalidRecord(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


# Markdown that does not belong in chat content meant for a customer: headings, lists, emphasis, code, links, tables.
MARKDOWN = re.compile(
    r"(^\s{0,3}#{1,6}\s)|(^\s*[-*+]\s+\S)|(^\s*\d+[.)]\s+\S)|(\*\*[^*]+\*\*)|(__[^_]+__)|(```)|(\[[^\]]+\]\([^)]+\))|(^\s*\|.*\|\s*$)",
    re.MULTILINE,
)


def _text(value: Any, reason: str) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecord(reason)
    return value.strip()


# Thinking that leaked into an answer (a server without a reasoning parser, a template that ignores the switch).
THINK_TAG = re.compile(r"</?think>")
REASONING_SUFFIX = "__reasoning_content"  # Data Designer's column for a text column's trace


def _message(spec: MessageSpec, row: dict, reasoning_field: str | None = None) -> dict:
    if spec.content is not None:
        return {"role": spec.role, "content": spec.content}
    assert spec.column is not None
    content = _text(row.get(spec.column), f"empty_{spec.role}_content")
    if spec.role == "assistant" and THINK_TAG.search(content):
        raise InvalidRecord("reasoning_in_content")
    message = {"role": spec.role, "content": content}
    trace = row.get(spec.column + REASONING_SUFFIX)
    if reasoning_field and isinstance(trace, str) and trace.strip():
        message[reasoning_field] = trace.strip()
    return message


def _with_metadata(record: dict, fields: list[str], row: dict) -> dict:
    """The recipe's metadata fields (seed fields, samplers, …) beside the training fields, as the step writes them."""
    return {**record, **{f: row.get(f) for f in fields}}


def openai_messages(spec: OpenAIMessagesProjection, row: dict) -> dict:
    messages = [_message(m, row, spec.reasoning_field) for m in spec.messages]
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidRecord("no_assistant_message")
    return _with_metadata({"messages": messages}, spec.metadata_fields, row)


def dpo_preference(spec: DPOPreferenceProjection, row: dict) -> dict:
    prompt = _text(row.get(spec.prompt), "empty_prompt")
    a = _text(row.get(spec.response_a), "empty_response")
    b = _text(row.get(spec.response_b), "empty_response")
    verdict = row.get(spec.judge)
    score = verdict.get(spec.score) if isinstance(verdict, dict) else None
    winner = score.get("score") if isinstance(score, dict) else score
    if winner not in ("A", "B"):
        raise InvalidRecord("judge_winner_not_a_or_b", repr(winner))
    chosen, rejected = (a, b) if winner == "A" else (b, a)
    if chosen == rejected:
        raise InvalidRecord("chosen_equals_rejected")
    if spec.format == "standard":
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    system = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
    return {
        "prompt": [*system, {"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _tool_call(value: Any, row_key: str) -> dict:
    """{name, arguments} from a structured column → an OpenAI tool call with JSON-string arguments."""
    value = _json_object(value, "tool_call_not_json")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise InvalidRecord("tool_call_without_name")
    args = _json_object(value.get("arguments", {}), "tool_arguments_not_json")
    if isinstance(args, dict):  # drop nulls a schema-constrained model fills optional fields with
        args = {k: v for k, v in args.items() if v is not None}
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    call_id = "call_" + hashlib.sha256(f"{row_key}|{value['name']}|{arguments}".encode()).hexdigest()[:16]
    return {"id": call_id, "type": "function", "function": {"name": value["name"], "arguments": arguments}}


def _json_object(value: Any, reason: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise InvalidRecord(reason) from None
    return value


def _openai_form(messages: Any, row_key: str) -> list[dict]:
    """A conversation as a model writes it → OpenAI form: tool-call `arguments` and tool-message `content` as JSON
    strings (not nested objects), each call with an id and type, each tool result pointing at its call."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 for m in messages):  # fmt: skip
        raise InvalidRecord("conversation_not_a_message_list")
    out, last_call = [], None
    for m in messages:
        # Data Designer's table gives every message every key another one has: drop the empty ones.
        m = {k: v for k, v in m.items() if v is not None or k == "content"}
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"] if isinstance(m["tool_calls"], list) else []
            m["tool_calls"] = [_tool_call(c.get("function", c) if isinstance(c, dict) else c, row_key) for c in calls]
            m.setdefault("content", None)
            last_call = m["tool_calls"][-1]["id"] if m["tool_calls"] else None
        elif m["role"] == "tool":
            if not isinstance(m.get("content"), str):
                m["content"] = json.dumps(m.get("content"), ensure_ascii=False)
            m.setdefault("tool_call_id", last_call)
        out.append(m)
    return out


def _from_source(spec: StructuredMessagesProjection, row: dict, row_key: str) -> dict:
    assert spec.source is not None
    value = _json_object(row.get(spec.source), "conversation_not_json")
    if not isinstance(value, dict):
        raise InvalidRecord("conversation_not_an_object")
    tools = value.get(spec.tools_key) or spec.tools
    return {"messages": _openai_form(value.get(spec.messages_key), row_key), "tools": tools}


def structured_messages(spec: StructuredMessagesProjection, row: dict) -> dict:
    row_key = json.dumps(row, sort_keys=True, default=str)
    if spec.source is not None:
        record = _from_source(spec, row, row_key)
        check_tool_conversation(record)
        return _with_metadata(record, spec.metadata_fields, row)
    messages: list[dict] = []
    call_id = None
    for m in spec.messages:
        if m.tool_call is not None:
            call = _tool_call(row.get(m.tool_call), row_key)
            call_id = call["id"]
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif m.role == "tool":
            msg = _message(m, row)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": msg["content"]})
        else:
            messages.append(_message(m, row, spec.reasoning_field))
    record = {"messages": messages, "tools": spec.tools}
    check_tool_conversation(record)
    return _with_metadata(record, spec.metadata_fields, row)


def check_arguments(args: dict, parameters: dict) -> None:
    """A call's arguments against its tool's declared JSON schema (types, enums, required), and nothing the tool does
    not declare: a model that learns to pass undeclared arguments breaks real tool servers."""
    missing = set(parameters.get("required", [])) - args.keys()
    if missing:
        raise InvalidRecord("tool_arguments_missing_required", ",".join(sorted(missing)))
    undeclared = args.keys() - set(parameters.get("properties", {}))
    if undeclared:
        raise InvalidRecord("tool_arguments_undeclared", ",".join(sorted(undeclared)))
    try:  # a tool list generated with the conversation may declare no valid schema
        validator = _validator(json.dumps(parameters, sort_keys=True))
    except jsonschema.SchemaError:
        raise InvalidRecord("tool_schema_invalid") from None
    error = jsonschema.exceptions.best_match(validator.iter_errors(args))
    if error is not None:
        where = ".".join(map(str, error.absolute_path)) or "arguments"
        raise InvalidRecord("tool_arguments_invalid", f"{where}: {error.message}")


@functools.lru_cache(maxsize=64)
def _validator(schema: str) -> jsonschema.protocols.Validator:
    parameters = json.loads(schema)
    cls = jsonschema.validators.validator_for(parameters, default=jsonschema.Draft202012Validator)
    cls.check_schema(parameters)
    return cls(parameters)


def check_tool_conversation(record: dict) -> None:
    """The rules a tool-calling SFT record must satisfy (OpenAI form)."""
    messages, tools = record["messages"], record["tools"]
    functions = {t["function"]["name"]: t["function"] for t in tools}
    calls = [(i, m) for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("tool_calls")]
    if len(calls) != 1 or len(calls[0][1]["tool_calls"]) != 1:
        raise InvalidRecord("not_exactly_one_tool_call")
    call_index, call_message = calls[0]
    call = call_message["tool_calls"][0]
    fn = functions.get(call["function"]["name"])
    if fn is None:
        raise InvalidRecord("unknown_tool", call["function"]["name"])
    if not isinstance(call["function"]["arguments"], str):
        raise InvalidRecord("tool_arguments_not_a_json_string")
    try:
        args = json.loads(call["function"]["arguments"])
    except json.JSONDecodeError:
        raise InvalidRecord("tool_arguments_not_json") from None
    if not isinstance(args, dict):
        raise InvalidRecord("tool_arguments_not_an_object")
    check_arguments(args, fn.get("parameters") or {})
    results = [i for i, m in enumerate(messages) if m["role"] == "tool"]
    if len(results) != 1 or results[0] <= call_index:
        raise InvalidRecord("not_exactly_one_tool_result_after_call")
    if messages[results[0]].get("tool_call_id") != call["id"]:
        raise InvalidRecord("tool_call_id_mismatch")
    if not isinstance(messages[results[0]].get("content"), str):
        raise InvalidRecord("tool_content_not_a_string")
    final = [m for m in messages[results[0] + 1 :] if m["role"] == "assistant" and m.get("content")]
    if not final:
        raise InvalidRecord("no_final_answer_after_tool_result")
    for m in messages:
        if m["role"] in ("user", "assistant") and isinstance(m.get("content"), str) and MARKDOWN.search(m["content"]):
            raise InvalidRecord("markdown_in_chat_content")


# Text a model copied from its prompt instead of filling in: template syntax, and fill-in placeholders.
UNRENDERED = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)
PLACEHOLDER = re.compile(
    r"\[(?:your|my|insert|customer|company|agent|name|date|order|product|phone|email|address|link|number)\b"
    r"[^\]\n]{0,40}\]",
    re.IGNORECASE,
)
LLM_COLUMN_TYPES = (LLMTextColumn, LLMStructuredColumn, LLMJudgeColumn)
IDENTIFYING = re.compile(r"(?:^|_)(?:id|number|email)$")  # argument names that say which thing a call is about
PROMPT_LABEL = re.compile(r"^\s*([A-Z][A-Za-z]*(?: [a-z][A-Za-z]*){0,3}):\s", re.MULTILINE)


def scaffolding_labels(recipe: Recipe) -> frozenset[str]:
    """The labels the recipe's prompts lay their material out with ("Tool result:", "Policy:"), line by line."""
    prompts = [c.prompt for c in recipe.columns.values() if isinstance(c, LLM_COLUMN_TYPES)]
    return frozenset(label for prompt in prompts for label in PROMPT_LABEL.findall(prompt))


def check_tool_data(record: dict, checks: ToolDataChecks, scaffolding: frozenset[str] = frozenset()) -> None:
    """What a trainer would not want in a well-formed tool conversation (OpenAI form). Each check can be off."""
    messages = record["messages"]
    texts = [m["content"] for m in messages if m["role"] != "system" and isinstance(m.get("content"), str)]
    texts += [c["function"]["arguments"] for m in messages for c in m.get("tool_calls") or []]
    if checks.unrendered_template and any(UNRENDERED.search(t) for t in texts):
        raise InvalidRecord("unrendered_template")
    if checks.placeholder_text and any(PLACEHOLDER.search(t) for t in texts):
        raise InvalidRecord("placeholder_text")
    if checks.tool_result_contradicts_call:
        call = next(c for m in messages for c in m.get("tool_calls") or [])
        args = json.loads(call["function"]["arguments"])
        result = next(m for m in messages if m["role"] == "tool")["content"]
        try:
            fields = json.loads(result)
        except json.JSONDecodeError:
            fields = None
        for name, value in args.items():
            if isinstance(fields, dict) and IDENTIFYING.search(name) and name in fields \
                    and str(fields[name]).strip() != str(value).strip():  # fmt: skip
                raise InvalidRecord("tool_result_contradicts_call", name)
    if checks.prompt_scaffolding and scaffolding:
        echoed = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(scaffolding))) + r"):")
        if any(m["role"] == "assistant" and echoed.search(m.get("content") or "") for m in messages):
            raise InvalidRecord("prompt_scaffolding_echoed")


def hf_form(messages: list[dict]) -> list[dict]:
    """OpenAI form → what Hugging Face chat templates read: a call's arguments as an object (a template dumps them to
    JSON itself; a string would come out double-encoded) and a string, not null, as the calling turn's content."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                     for c in m["tool_calls"]]  # fmt: skip
            m = {**m, "content": m.get("content") or "", "tool_calls": calls}
        out.append(m)
    return out


def wire_form(messages: list[dict]) -> list[dict]:
    """The inverse of hf_form: each call's arguments as a JSON string, the form OpenAI-compatible servers parse."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{**c, "function": {**c["function"], "arguments": _json_text(c["function"]["arguments"])}}
                     for c in m["tool_calls"]]  # fmt: skip
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def _json_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def dataset_row(spec: Any, row: dict) -> dict:
    """No projection: the row as Data Designer made it, every column it keeps (the job's own flags left out)."""
    return {k: v for k, v in row.items() if not k.startswith("__sdg")}


PROJECTIONS: dict[str, Callable[[Any, dict], dict]] = {
    "openai_messages": openai_messages,
    "dpo_preference": dpo_preference,
    "structured_messages": structured_messages,
    "dataset": dataset_row,
}


def failed_filter(filters: list[Filter], row: dict) -> str | None:
    """The name of the first filter the row does not pass (a missing or non-numeric value does not pass)."""
    for f in filters:
        value = row.get(f.column)
        if f.score is not None:
            value = value.get(f.score) if isinstance(value, dict) else None
            value = value.get("score") if isinstance(value, dict) else value  # Data Designer: {score, reasoning}
        if f.equals is not None and value != f.equals or f.one_of is not None and value not in f.one_of:
            return f.name
        if f.min is not None or f.max is not None:
            try:
                number = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                return f.name
            if f.min is not None and number < f.min or f.max is not None and number > f.max:
                return f.name
    return None


def project_rows(
    spec: Projection,
    rows: list[dict],
    filters: list[Filter] = (),  # type: ignore[assignment]
    scaffolding: frozenset[str] = frozenset(),
) -> tuple[list[dict], Counter[str]]:
    """Valid records in row order, and the count of dropped rows by reason. `scaffolding`: the labels of the recipe's
    prompts (scaffolding_labels), which tool data's final answers must not repeat."""
    fn = PROJECTIONS[spec.type]
    records, dropped = [], Counter[str]()
    for row in rows:
        if row.get(TRUNCATED):
            dropped["truncated"] += 1
            continue
        if (failed := failed_filter(filters, row)) is not None:
            dropped[f"filter:{failed}"] += 1
            continue
        try:
            record = fn(spec, row)
            if isinstance(spec, StructuredMessagesProjection):
                check_tool_data(record, spec.checks, scaffolding)
                if spec.tool_call_format == "hf":
                    record = {**record, "messages": hf_form(record["messages"])}
            records.append(record)
        except InvalidRecord as e:
            dropped[e.reason] += 1
    return records, dropped
