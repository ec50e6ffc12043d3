"""`overthink serve`: an OpenAI-compatible server whose completions are monitored and halted per request.

Application layer (the core in `monitor/` never imports it):

- protocol.py  the request bodies (OpenAI chat and text completions, plus the `overthink` object) and their checks
- engine.py    HFServeEngine: one worker thread batches the waiting requests into monitored HF generation,
               streams each token's text back, and cancels a request whose client went away
- app.py       the FastAPI app: routes, server-sent events, OpenAI-style errors, the honest response
- cli.py       `overthink serve` (flags, model loading, uvicorn)
"""
