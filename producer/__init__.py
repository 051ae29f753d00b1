"""llmq's producer side: the request contract and the client API callers import."""

from producer.models import JobState, LLMRequest, LLMResponse, Message, Usage

__all__ = ["JobState", "LLMRequest", "LLMResponse", "LLMService", "Message", "Usage"]


def __getattr__(name: str):  # LLMService pulls in redis; import it only when asked for
    if name == "LLMService":
        from producer.service import LLMService

        return LLMService
    raise AttributeError(name)
