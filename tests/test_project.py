"""Projections turn rows into training records and drop (and count) the ones that break the format's rules."""

from __future__ import annotations

import json

import pytest

from sdg_job.config import load_recipe
from sdg_job.project import InvalidRecord, check_arguments, check_tool_conversation, project_rows

SFT = load_recipe("tiny").output_projection
DPO = load_recipe("rl_pref").output_projection
TOOLS = load_recipe("customer_support_tools").output_projection


def tool_row(**changes) -> dict:
    row = {
        "customer_message": "Hi, my order ORD-1 never arrived.",
        "tool_call": {"name": "get_order_status", "arguments": {"order_id": "ORD-1", "reason": None}},
        "tool_result": {"order_id": "ORD-1", "status": "in transit", "details": "Delayed by carrier."},
        "final_answer": "Your order ORD-1 is in transit and was delayed by the carrier.",
    }
    row.update(changes)
    return row


def test_openai_messages_maps_columns_to_roles() -> None:
    records, dropped = project_rows(SFT, [{"user_message": " Hi? ", "assistant_message": "Hello."}])
    assert records == [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}]
    assert not dropped


@pytest.mark.parametrize("bad", [None, "", "   ", 3])
def test_openai_messages_drops_empty_content(bad) -> None:
    records, dropped = project_rows(SFT, [{"user_message": "Hi", "assistant_message": bad}])
    assert records == [] and dropped == {"empty_assistant_content": 1}


def test_dpo_winner_maps_to_chosen_and_rejected() -> None:
    row = {"prompt": "Q", "response_a": "good", "response_b": "bad", "preference": {"winner": {"score": "A"}}}
    b_row = {**row, "preference": {"winner": {"score": "B", "reasoning": "."}}}
    records, dropped = project_rows(DPO, [row, b_row])
    assert records == [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q", "chosen": "bad", "rejected": "good"},
    ]
    assert not dropped


def test_dpo_drops_identical_pairs_and_unknown_winners() -> None:
    same = {"prompt": "Q", "response_a": "x", "response_b": "x", "preference": {"winner": {"score": "A"}}}
    tie = {"prompt": "Q", "response_a": "x", "response_b": "y", "preference": {"winner": {"score": "tie"}}}
    records, dropped = project_rows(DPO, [same, tie])
    assert records == [] and dropped == {"chosen_equals_rejected": 1, "judge_winner_not_a_or_b": 1}


def test_structured_messages_builds_an_openai_tool_conversation() -> None:
    records, dropped = project_rows(TOOLS, [tool_row()])
    assert not dropped
    (record,) = records
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    call = record["messages"][2]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_order_status"
    assert json.loads(call["function"]["arguments"]) == {"order_id": "ORD-1"}  # a JSON string, nulls dropped
    assert record["messages"][3]["tool_call_id"] == call["id"]
    assert json.loads(record["messages"][3]["content"])["status"] == "in transit"
    assert {t["function"]["name"] for t in record["tools"]} >= {"get_order_status"}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"tool_call": {"name": "delete_account", "arguments": {"order_id": "1"}}}, "unknown_tool"),
        ({"tool_call": {"name": "start_return", "arguments": {"order_id": "1"}}}, "tool_arguments_missing_required"),
        ({"tool_call": {"name": "get_order_status", "arguments": "[1, 2]"}}, "tool_arguments_not_an_object"),
        ({"tool_call": {"name": "get_order_status", "arguments": "{oops"}}, "tool_arguments_not_json"),
        ({"tool_call": {"arguments": {}}}, "tool_call_without_name"),
        # seen on a real 135M run: an argument the tool does not declare
        (
            {"tool_call": {"name": "get_order_status", "arguments": {"order_id": "1", "reason": "late"}}},
            "tool_arguments_undeclared",
        ),
        ({"tool_call": {"name": "get_order_status", "arguments": {"order_id": 10231}}}, "tool_arguments_invalid"),
        ({"final_answer": "## Update\n**Good news**: it ships today."}, "markdown_in_chat_content"),
        ({"final_answer": "- step one\n- step two"}, "markdown_in_chat_content"),
        ({"final_answer": ""}, "empty_assistant_content"),
    ],
)
def test_structured_messages_drops_broken_tool_conversations(changes: dict, reason: str) -> None:
    records, dropped = project_rows(TOOLS, [tool_row(**changes)])
    assert records == [] and dropped == {reason: 1}


def test_tool_conversation_checks_ids_order_and_final_answer() -> None:
    (record,) = project_rows(TOOLS, [tool_row()])[0]
    mismatched = json.loads(json.dumps(record))
    mismatched["messages"][3]["tool_call_id"] = "call_other"
    with pytest.raises(InvalidRecord, match="tool_call_id_mismatch"):
        check_tool_conversation(mismatched)
    no_final = json.loads(json.dumps(record))
    no_final["messages"].pop()
    with pytest.raises(InvalidRecord, match="no_final_answer_after_tool_result"):
        check_tool_conversation(no_final)
    two_calls = json.loads(json.dumps(record))
    two_calls["messages"].insert(2, two_calls["messages"][2])
    with pytest.raises(InvalidRecord, match="not_exactly_one_tool_call"):
        check_tool_conversation(two_calls)


def test_tool_arguments_are_checked_against_the_declared_schema() -> None:
    parameters = {
        "type": "object",
        "properties": {"order_id": {"type": "string", "pattern": "^ORD-"}, "speed": {"enum": ["standard", "express"]}},
        "required": ["order_id"],
    }
    check_arguments({"order_id": "ORD-1", "speed": "express"}, parameters)
    with pytest.raises(InvalidRecord, match="tool_arguments_invalid: speed: 'overnight' is not one of"):
        check_arguments({"order_id": "ORD-1", "speed": "overnight"}, parameters)
    with pytest.raises(InvalidRecord, match="tool_arguments_invalid: order_id: '1' does not match"):
        check_arguments({"order_id": "1"}, parameters)
    with pytest.raises(InvalidRecord, match="tool_schema_invalid"):
        check_arguments({"order_id": "1"}, {"type": "object", "properties": {"order_id": {"type": 12}}})
