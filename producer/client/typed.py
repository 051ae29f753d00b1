"""`parsed` as the caller's own class: what `LLMService` remembers of a pydantic `response_format`.

The class cannot travel through Redis (only its JSON schema does), so the process that
submitted the job keeps it, by job id, and turns the answer's JSON into an instance when it
reads the job back (`generate`, `poll`, `wait`, `results`, the final stream chunk). Another
process reading the same job gets the JSON as it came.
"""

from __future__ import annotations

from collections import OrderedDict

from pydantic import BaseModel

from llmq.contract.models import JobRecord, JobRequest, LLMResponse

#: Jobs whose class is remembered; the oldest are forgotten first.
RESPONSE_MODELS_KEPT = 10_000


class ResponseModels:
    def __init__(self, kept: int = RESPONSE_MODELS_KEPT) -> None:
        self.kept = kept
        self._by_job: OrderedDict[str, type[BaseModel]] = OrderedDict()

    def remember(self, job_id: str, request: JobRequest) -> None:
        model_class = getattr(request, "response_model", None)
        if model_class is not None:
            self._by_job[job_id] = model_class
            while len(self._by_job) > self.kept:
                self._by_job.popitem(last=False)

    def record(self, record: JobRecord) -> JobRecord:
        """The record with `result.parsed` as an instance of its class, when one is remembered."""
        if record.job_id not in self._by_job or not isinstance(record.result, LLMResponse):
            return record
        return record.model_copy(update={"result": self.response(record.job_id, record.result)})

    def response(self, job_id: str, response: LLMResponse) -> LLMResponse:
        model_class = self._by_job.get(job_id)
        if model_class is None or not isinstance(response.parsed, (dict, list)):
            return response
        return response.model_copy(update={"parsed": model_class.model_validate(response.parsed)})
