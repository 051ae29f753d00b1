"""llmq for LangChain (`pip install 'llmq[langchain]'`): `ChatLLMQ` and `LLMQEmbeddings`, drop-in
replacements for langchain-openai's `ChatOpenAI` and `OpenAIEmbeddings` whose every call is an
llmq job, so code written against LangChain's interfaces switches with one line:

    from llmq.langchain import ChatLLMQ, LLMQEmbeddings

    llm = ChatLLMQ(model="gpt-4o-mini", temperature=0)          # was ChatOpenAI(...)
    embeddings = LLMQEmbeddings(model="text-embedding-3-small")  # was OpenAIEmbeddings(...)

This part imports `llmq.client` and `llmq.contract` only, like any other caller.
"""

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("llmq.langchain needs langchain-core: pip install 'llmq[langchain]'") from exc

from llmq.langchain.chat import ChatLLMQ
from llmq.langchain.connection import close_services
from llmq.langchain.embeddings import LLMQEmbeddings
from llmq.langchain.messages import StreamRestartedError

__all__ = ["ChatLLMQ", "LLMQEmbeddings", "StreamRestartedError", "close_services"]
