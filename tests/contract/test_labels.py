"""What Flower shows for a job's message (contract/labels.py): the job's names, never its prompt."""

from __future__ import annotations

import ast

from llmq.contract.labels import MAX_VALUE_CHARS, TaskLabel
from llmq.contract.models import Hop, LLMRequest

PROMPT = "the text of the prompt"


def label(**extra: object) -> TaskLabel:
    request = LLMRequest(messages=[{"role": "user", "content": PROMPT}], model="gpt-4o-mini",
                         metadata={"caller": "etl", "secret_note": "not shown"})
    return TaskLabel.for_job(request, Hop(provider="openai", model="gpt-4o-mini-2024-07-18"),
                             batch_id="batch_1", custom_id="row-17", **extra)


def test_the_label_names_the_job_and_not_its_request() -> None:
    shown = label()
    assert shown.argsrepr() == ("custom_id=row-17 batch_id=batch_1 caller=etl model=gpt-4o-mini "
                                "via=openai/gpt-4o-mini-2024-07-18 attempt=1")
    assert ast.literal_eval(shown.kwargsrepr()) == {
        "custom_id": "row-17", "batch_id": "batch_1", "caller": "etl", "model": "gpt-4o-mini",
        "provider": "openai", "provider_model": "gpt-4o-mini-2024-07-18", "attempt": 1}
    for text in (shown.argsrepr(), shown.kwargsrepr(), shown.stored()):
        assert PROMPT not in text and "not shown" not in text


def test_the_stored_label_comes_back_with_the_attempt_and_hop_of_its_message() -> None:
    stored = label().on_hop(Hop(provider="backup", model="claude")).stored()
    again = TaskLabel.from_stored(stored, attempt=3)
    assert again is not None and "via=backup/claude attempt=3" in again.argsrepr()
    assert TaskLabel.from_stored("", attempt=1) is None and TaskLabel.from_stored("{not json", attempt=1) is None


def test_odd_values_stay_one_word_and_long_ones_are_cut() -> None:
    request = LLMRequest(messages=[{"role": "user", "content": "x"}], model="m")
    shown = TaskLabel.for_job(request, Hop(provider="p", model="m"), batch_id=None, custom_id="a b" + "c" * 300)
    assert "batch_id" not in shown.argsrepr() and "caller" not in shown.argsrepr()
    custom_id = ast.literal_eval(shown.kwargsrepr())["custom_id"]
    assert len(custom_id) == MAX_VALUE_CHARS and custom_id.endswith("...")
    assert shown.argsrepr().startswith("custom_id='a bccc")
