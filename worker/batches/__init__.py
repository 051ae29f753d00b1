"""Provider batch APIs: the path of jobs submitted with a completion window.

    intake (create_job.lua) -> assemble.py -> provider batch (submitting) -> poll.py:
    submit -> poll ... -> results -> settle.py: each line settled on its job, as a call's result

One module per provider family speaks its batch API (`openai.py` with Azure, `anthropic.py`,
`gemini.py`) over a small base (`base.py`); `registry.py` maps adapter types to them. Every
worker tends the provider entries it serves (the runtime runs `tend.provider_batch_loop`,
no beat needed), and beat sends `llmq.provider_batches` to each entry's queue as well
(`tend.beat_schedule`); locks in Redis keep it to one process per intake and per provider batch.
"""
