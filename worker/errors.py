"""Every error llmq raises about a provider call, in one tree.

Adapters translate provider failures once, into these classes (`raise X from
exc`). Retry and fallback decide on the class alone, never on message text::

    LLMQError
     ├── ProviderError                      a provider call failed
     │    ├── AuthenticationError      401  key missing/invalid          -> next provider
     │    ├── PermissionDeniedError    403  key lacks access             -> next provider
     │    ├── ModelNotFoundError       404  model/deployment unknown     -> next provider
     │    ├── BadRequestError          400  the request itself is wrong  -> fail at once
     │    │    ├── ContextWindowExceededError  prompt too long  -> larger-context model
     │    │    └── ContentFilteredError        refused by a filter -> next provider
     │    ├── RateLimitedError         429  carries retry_after_s        -> same provider, later
     │    ├── QuotaExceededError            llmq's daily quota/budget spent -> next provider
     │    ├── ProviderUnavailableError      llmq's circuit breaker is open  -> next provider
     │    ├── OverloadedError     503/529  provider busy                 -> same provider, later
     │    │    └── FlexCapacityError           a flex-tier call refused for capacity
     │    │                                    -> at once at the standard tier, if the job allows
     │    ├── ServerError              5xx                               -> same provider, later
     │    │    └── MalformedResponseError  unparseable body / stream cut short
     │    ├── ProviderTimeoutError          no answer within the timeout -> same provider, later
     │    ├── ProviderConnectionError       could not connect / reset    -> same provider, later
     │    ├── ProviderBatchError            a provider batch did not run the line (the batch
     │    │    │                            failed or was cancelled) -> same provider, normal lane
     │    │    └── ProviderBatchExpiredError    the line expired with the batch's window
     │    └── OutputValidationError         JSON was asked for and the answer is not JSON, or does
     │                                      not match the schema -> same provider again
     │                                      (retry.invalid_output_retries times, default once),
     │                                      then the next provider
     ├── JobCancelledError                  the caller cancelled the job
     └── DeadlineExceededError              the job's deadline passed

`retryable` means the same provider may succeed if asked again later;
`fallback` means another provider on the route may succeed where this one failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class LLMQError(Exception):
    retryable: ClassVar[bool] = False
    fallback: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "message": self.message, "retryable": self.retryable}


class ProviderError(LLMQError):
    retryable = False
    fallback = True

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        status_code: int | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.model = model
        self.status_code = status_code
        self.request_id = request_id
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        where = "/".join(part for part in (self.provider, self.model) if part)
        status = f" HTTP {self.status_code}" if self.status_code else ""
        return f"{type(self).__name__}{status}{' from ' + where if where else ''}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "provider": self.provider,
            "model": self.model,
            "status_code": self.status_code,
            "request_id": self.request_id,
            "retry_after_s": self.retry_after_s,
        }


class AuthenticationError(ProviderError):
    pass


class PermissionDeniedError(ProviderError):
    pass


class ModelNotFoundError(ProviderError):
    pass


class BadRequestError(ProviderError):
    # A malformed request fails the same way everywhere: no retry, no fallback.
    fallback = False


class ContextWindowExceededError(BadRequestError):
    # Only a larger-context model can help; routing decides whether one exists.
    fallback = True


class ContentFilteredError(BadRequestError):
    fallback = True


class RateLimitedError(ProviderError):
    retryable = True


class QuotaExceededError(ProviderError):
    """A daily quota or budget set in llmq's config is spent (not the provider's 429)."""


class ProviderUnavailableError(ProviderError):
    """The provider's circuit is open (it kept failing): llmq skips it without a call."""


class OverloadedError(ProviderError):
    retryable = True


class ServerError(ProviderError):
    retryable = True


class MalformedResponseError(ServerError):
    pass


class ProviderTimeoutError(ProviderError):
    retryable = True


class ProviderConnectionError(ProviderError):
    retryable = True


class FlexCapacityError(OverloadedError):
    """A flex-tier call refused for lack of capacity (OpenAI's 429 "Resource Unavailable", Gemini's 503)."""


class ProviderBatchError(ProviderError):
    """A line of a provider batch that the batch did not run: it goes back on its route as a normal call."""

    retryable = True


class ProviderBatchExpiredError(ProviderBatchError):
    """The line was still unanswered when the batch's window (the provider's, or the job's) ran out."""


class OutputValidationError(ProviderError):
    """The answer is not the JSON the request asked for. `parsed` is never handed back then.

    Asked again at once on the same provider, `retry.invalid_output_retries` times (a model
    that slipped once often answers well the next time), then the job moves along its route.
    It says nothing of the provider's health, so the circuit breaker does not count it.
    """

    retryable = True


class JobCancelledError(LLMQError):
    pass


class DeadlineExceededError(LLMQError):
    pass


ERRORS_BY_NAME: dict[str, type[LLMQError]] = {
    cls.__name__: cls
    for cls in (
        LLMQError, ProviderError, AuthenticationError, PermissionDeniedError, ModelNotFoundError,
        BadRequestError, ContextWindowExceededError, ContentFilteredError, RateLimitedError, QuotaExceededError,
        ProviderUnavailableError,
        OverloadedError, ServerError, MalformedResponseError, ProviderTimeoutError, ProviderConnectionError,
        OutputValidationError, FlexCapacityError, ProviderBatchError, ProviderBatchExpiredError, JobCancelledError,
        DeadlineExceededError,
    )
}


def from_record(details: Mapping[str, Any]) -> LLMQError:
    """The typed error again from its record (`to_dict`, as a job's `error` field stores it)."""
    name, message = str(details.get("type")), str(details.get("message", ""))
    cls = ERRORS_BY_NAME.get(name)
    if cls is None:
        return LLMQError(f"{name}: {message}")
    if issubclass(cls, ProviderError):
        return cls(message, provider=details.get("provider"), model=details.get("model"),
                   status_code=details.get("status_code"), request_id=details.get("request_id"),
                   retry_after_s=details.get("retry_after_s"))
    return cls(message)


def error_for_status(status_code: int) -> type[ProviderError]:
    """The class for an HTTP status when the body says nothing more specific."""
    if status_code == 400 or status_code == 422:
        return BadRequestError
    if status_code == 401:
        return AuthenticationError
    if status_code == 403:
        return PermissionDeniedError
    if status_code == 404:
        return ModelNotFoundError
    if status_code == 408:
        return ProviderTimeoutError
    if status_code == 409:  # a conflicting request in flight: the SDKs retry it
        return OverloadedError
    if status_code == 413:
        return ContextWindowExceededError
    if status_code == 429:
        return RateLimitedError
    if status_code in (503, 529):
        return OverloadedError
    if status_code >= 500:
        return ServerError
    return BadRequestError
