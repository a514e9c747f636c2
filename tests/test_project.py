"""Projections turn rows into training records and drop (and count) the ones that break the format's rules."""

from __future__ import annotations

import json

import pytest

from sdg_job.config import load_recipe
from sdg_job.errors import RecipeError
from sdg_job.project import (
    InvalidRecord,
    check_arguments,
    check_tool_conversation,
    project_rows,
    scaffolding_labels,
    wire_form,
)

SFT = load_recipe("tiny").output_projection
DPO = load_recipe("rl_pref").output_projection
DPO_STANDARD = load_recipe("rl_pref", ["output_projection.format=standard", "output_projection.system_prompt=null"])
TOOLS = load_recipe("customer_support_tools").output_projection
TOOLS_OPENAI = load_recipe("customer_support_tools", ["output_projection.tool_call_format=openai"]).output_projection
LABELS = scaffolding_labels(load_recipe("customer_support_tools"))


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


def test_dpo_pairs_are_conversational_with_the_system_prompt_and_the_judges_winner_chosen() -> None:
    """TRL's conversational form: it renders prompt + chosen/rejected with the trained model's chat template."""
    row = {"prompt": "Q", "response_a": "good", "response_b": "bad", "preference": {"winner": {"score": "A"}}}
    b_row = {**row, "preference": {"winner": {"score": "B", "reasoning": "."}}}
    records, dropped = project_rows(DPO, [row, b_row])
    prompt = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Q"}]
    assert records == [
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "bad"}],
         "rejected": [{"role": "assistant", "content": "good"}]},
    ]  # fmt: skip
    assert not dropped
    records, _ = project_rows(DPO_STANDARD.output_projection, [row])
    assert records == [{"prompt": "Q", "chosen": "good", "rejected": "bad"}]  # the step's plain strings


def test_a_system_prompt_needs_the_conversational_form() -> None:
    with pytest.raises(RecipeError, match="system_prompt needs format: conversational"):
        load_recipe("rl_pref", ["output_projection.format=standard"])


def test_dpo_drops_identical_pairs_and_unknown_winners() -> None:
    same = {"prompt": "Q", "response_a": "x", "response_b": "x", "preference": {"winner": {"score": "A"}}}
    tie = {"prompt": "Q", "response_a": "x", "response_b": "y", "preference": {"winner": {"score": "tie"}}}
    records, dropped = project_rows(DPO, [same, tie])
    assert records == [] and dropped == {"chosen_equals_rejected": 1, "judge_winner_not_a_or_b": 1}


def test_tool_conversations_take_the_form_hugging_face_chat_templates_read() -> None:
    """Arguments as an object (a template JSON-dumps them itself: a string would come out double-encoded) and ''
    rather than null as the calling turn's content (templates concatenate it)."""
    records, dropped = project_rows(TOOLS, [tool_row()])
    assert not dropped
    (record,) = records
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    calling = record["messages"][2]
    assert calling["content"] == ""
    (call,) = calling["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_order_status"
    assert call["function"]["arguments"] == {"order_id": "ORD-1"}  # an object, nulls dropped
    assert record["messages"][3]["tool_call_id"] == call["id"]
    assert json.loads(record["messages"][3]["content"])["status"] == "in transit"  # a tool result is text
    assert {t["function"]["name"] for t in record["tools"]} >= {"get_order_status"}


def test_the_openai_wire_form_is_an_option() -> None:
    (record,), _ = project_rows(TOOLS_OPENAI, [tool_row()])
    calling = record["messages"][2]
    assert calling["content"] is None
    assert json.loads(calling["tool_calls"][0]["function"]["arguments"]) == {"order_id": "ORD-1"}  # a JSON string
    (hf,), _ = project_rows(TOOLS, [tool_row()])  # and back, as the token count sends records to the server
    assert wire_form(hf["messages"])[2]["tool_calls"] == calling["tool_calls"]


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


# Seen in a 12-record run of customer_support_tools on the embedded 135M model, each in 3 of the 12.
@pytest.mark.parametrize(
    ("changes", "reason", "check"),
    [
        ({"tool_result": {"order_id": "ORD-1", "status": "shipped", "details": "Order {{order_id}} left today."}},
         "unrendered_template", "unrendered_template"),
        ({"final_answer": "Your order is on its way. Best regards, [Your Name]"}, "placeholder_text",
         "placeholder_text"),
        ({"tool_result": {"order_id": "ORD-2", "status": "in transit", "details": "Delayed."}},
         "tool_result_contradicts_call", "tool_result_contradicts_call"),
        ({"final_answer": "Tool result: in transit. Policy: refunds after 30 days. Your order is on its way."},
         "prompt_scaffolding_echoed", "prompt_scaffolding"),
    ],
)  # fmt: skip
def test_tool_data_a_trainer_would_not_want_is_dropped_by_reason_unless_its_check_is_off(
    changes: dict, reason: str, check: str
) -> None:
    records, dropped = project_rows(TOOLS, [tool_row(**changes)], scaffolding=LABELS)
    assert records == [] and dropped == {reason: 1}
    off = load_recipe("customer_support_tools", [f"output_projection.checks.{check}=false"]).output_projection
    records, dropped = project_rows(off, [tool_row(**changes)], scaffolding=LABELS)
    assert len(records) == 1 and not dropped


def test_tool_data_checks_leave_ordinary_answers_alone() -> None:
    fine = tool_row(
        final_answer="Your order ORD-1 [shipped on Monday] is in transit; our return policy allows 30 days.",
        tool_result={"order_id": " ORD-1", "status": "in transit", "details": "Carrier: DHL. Reason: weather."},
    )
    records, dropped = project_rows(TOOLS, [fine], scaffolding=LABELS)
    assert len(records) == 1 and not dropped
    assert LABELS == {"Customer message", "Tool result", "Policy", "Tools"}  # the recipe's prompts, line by line


def test_tool_conversation_checks_ids_order_and_final_answer() -> None:
    (record,) = project_rows(TOOLS_OPENAI, [tool_row()])[0]
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
