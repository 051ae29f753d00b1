"""Every error the HTTP front answers, in one place, as OpenAI's error JSON.

Each is `{"error": {"message", "type", "param", "code"}}` with the status OpenAI uses, so
every OpenAI SDK raises its usual exception for it::

    APIError                                       status  the OpenAI SDK raises
     ├── InvalidRequestError                        400     BadRequestError       (`param` names the field)
     ├── InvalidAPIKeyError                         401     AuthenticationError
     ├── ModelNotAllowedError                       403     PermissionDeniedError (the key's --models)
     ├── NotFoundError                              404     NotFoundError         (no such model, file, batch)
     ├── MethodNotAllowedError                      405     APIStatusError
     ├── PayloadTooLargeError                       413     APIStatusError
     ├── CallerLimitedError                         429     RateLimitError        (`retry-after`: the key's own
     │                                                                             requests/min or daily USD)
     ├── JobFailedHTTPError                         502     InternalServerError   (the job failed on every
     │                                                                             provider of its route)
     └── JobTimedOutError                           504     InternalServerError   (the job's deadline passed)

A job that failed because of the request itself (a prompt over the context window, a
content filter, a provider's 400) answers 400 like OpenAI does, not 502: `job_error`
maps the worker's typed error record (its class name) to one of these, in one table.
502 and 504 carry `x-should-retry: false`: llmq already retried and fell back along the
route, so an SDK retrying on its own would only run the job again.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from starlette.responses import JSONResponse

#: The response header that names the job (or batch) a request made: `llmq status <id>` finds it.
JOB_ID_HEADER = "x-llmq-job-id"
BATCH_ID_HEADER = "x-llmq-batch-id"


class APIError(Exception):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "api_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class InvalidRequestError(APIError):
    status = 400
    error_type = "invalid_request_error"


class InvalidAPIKeyError(APIError):
    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class ModelNotAllowedError(APIError):
    status = 403
    error_type = "permission_error"
    default_code = "model_not_allowed"


class NotFoundError(APIError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowedError(APIError):
    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLargeError(APIError):
    status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class CallerLimitedError(APIError):
    status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float, code: str) -> None:
        # Whole seconds, rounded up: the SDKs read `retry-after-ms` first and fall back to this.
        super().__init__(message, code=code, headers={
            "retry-after": str(max(1, math.ceil(retry_after_s))), "retry-after-ms": str(max(1, round(retry_after_s * 1000))),
        })


class JobFailedHTTPError(APIError):
    status = 502
    error_type = "api_error"

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code, headers={**(headers or {}), "x-should-retry": "false"})


class JobTimedOutError(JobFailedHTTPError):
    status = 504
    error_type = "timeout_error"
    default_code = "deadline_exceeded"


#: The worker's error classes (by name, as a job's error record carries them) that are about the
#: request itself: answered 400 with OpenAI's code for them. Every other failure is a 502.
_REQUEST_ERRORS = {
    "ContextWindowExceededError": "context_length_exceeded",
    "ContentFilteredError": "content_filter",
    "BadRequestError": "invalid_request",
    "OutputValidationError": "output_validation_failed",
}


def job_error(job_id: str, error: dict[str, Any] | None, *, state: str) -> APIError:
    """The HTTP error for a job that ended without an answer (its typed error record)."""
    error = error or {}
    error_type = str(error.get("type") or "Error")
    message = f"job {job_id} {state}: {error_type}: {error.get('message', '')}".rstrip(": ")
    headers = {JOB_ID_HEADER: job_id}
    if error_type == "DeadlineExceededError":
        return JobTimedOutError(message, headers=headers)
    if error_type in _REQUEST_ERRORS:
        return InvalidRequestError(message, code=_REQUEST_ERRORS[error_type], headers=headers)
    return JobFailedHTTPError(message, code=_snake(error_type), headers=headers)


def _snake(class_name: str) -> str:
    """`ProviderTimeoutError` -> `provider_timeout_error`: a stable code from the error's class."""
    return "".join(f"_{char.lower()}" if char.isupper() else char for char in class_name).lstrip("_")
