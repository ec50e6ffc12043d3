"""The FastAPI app of `overthink serve`: OpenAI's chat and text completions, monitored and halted per request.

The response is honest about what happened:
- the reasoning comes as `reasoning_content` (the model's end-of-reasoning marker removed), the answer as
  `content`, as vLLM's reasoning parsers return them; a model without a reasoning format writes `content` only;
- `finish_reason`: `"stop"` (the model ended on its own, or a `stop` string), `"length"` (the reasoning budget,
  `max_tokens`, ran out; with an exit cue forced when the server exits at the budget), or `"halted"` (the
  monitor's policy stopped the reasoning, forced the exit cue, and the model answered);
- `usage` counts prompt and completion tokens (reasoning + forced exit cue + answer), with
  `completion_tokens_details.reasoning_tokens` and `.probe_tokens` (trial answers a policy decoded);
- a top-level `overthink` object: `halted`, `stop_reason` (words), `decision_point` (where it halted),
  `accounting` (`reasoning`, `forced`, `answer`, `probe`), `policy` and `trace_id` (the id of the request's line in
  the trace log). A stream sends it in its final chunk.

Errors are OpenAI-shaped JSON: `{"error": {"message", "type", "param", "code"}}`, status 400 for a bad request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from monitor.answers import normalize_kind
from monitor.bounds import check_budget, limits_of
from monitor.config import RunConfig
from monitor.decision import parse_policy
from monitor.tasks import Task
from monitor.trace import generated_tokens
from serve.engine import HFServeEngine, Job, JobResult
from serve.protocol import ChatRequest, CompletionRequest

FINISH_HALTED = "halted"


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TextSplit:
    """Turns a stream of (text, phase) pieces into reasoning and content deltas.

    With a reasoning marker (e.g. "</think>"): reasoning-phase text is reasoning, the forced exit cue and the
    answer are content; the marker itself is removed from both (text that may be its start is held back until
    it is known), and content starts at its first non-blank character. Without one, everything is content."""

    def __init__(self, marker: str | None) -> None:
        self.marker = marker or None
        self._held = {"reasoning": "", "content": ""}
        self._content_started = False

    def feed(self, text: str, phase: str) -> tuple[str, str]:
        if self.marker is None:
            return "", text
        kind = "reasoning" if phase == "reasoning" else "content"
        buf = (self._held[kind] + text).replace(self.marker, "")
        keep = 0
        for j in range(min(len(self.marker) - 1, len(buf)), 0, -1):
            if buf.endswith(self.marker[:j]):
                keep = j
                break
        out, self._held[kind] = (buf[:-keep], buf[-keep:]) if keep else (buf, "")
        return (out, "") if kind == "reasoning" else ("", self._content(out))

    def _content(self, out: str) -> str:
        if not self._content_started:
            out = out.lstrip()
            self._content_started = bool(out)
        return out

    def flush(self) -> tuple[str, str]:
        r, c = self._held["reasoning"], self._held["content"]
        self._held = {"reasoning": "", "content": ""}
        return r, self._content(c) if c else ""


def create_app(engine: HFServeEngine | Any, model_name: str, cfg: RunConfig, default_policy: str = "observe",
               default_halt_after: int | None = None, known_keys: list[str] | None = None,
               bundles: dict[str, Any] | None = None) -> FastAPI:
    """The app serving `engine`'s model (`HFServeEngine`, or `serve.proxy.ProxyEngine` in front of an upstream)
    as `model_name`; requests without an `overthink.policy` use the server's `default_policy` /
    `default_halt_after`; a threshold policy may name the signal keys `known_keys` (default: every family's);
    `bundles` maps a name to a loaded probe policy (`ProbePolicy`) requests may name as their policy. A bundle's
    guarantee holds for the exit cue it was calibrated with, so a request that names a bundle cannot change it."""
    bundles = dict(bundles or {})
    lm = engine.lm
    known = known_keys if known_keys is not None else cfg.signal_keys()
    limits = limits_of(lm.model)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        aclose = getattr(engine, "aclose", None)
        if aclose is not None:  # an engine that lives on this loop (vLLM's AsyncLLM) closes on it
            await aclose()
        else:
            await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app = FastAPI(title="overthink serve", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = str(err.get("msg", "invalid request"))
        if err.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        elif err.get("type") == "extra_forbidden":
            msg = f"unknown field {param!r}"
        elif param:
            msg = f"{param}: {msg}"
        return JSONResponse(error_body(msg, param), status_code=400)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.param, exc.kind), status_code=exc.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.counts()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "overthink"}]}

    def make_job(req: ChatRequest | CompletionRequest, prompt: str, question: str) -> Job:
        if req.model != model_name:
            raise BadRequest(f"the model {req.model!r} does not exist here; this server serves {model_name!r} "
                             "(GET /v1/models)", "model", 404, "NotFoundError")
        ov = req.overthink
        if ov is not None and (ov.policy is not None or ov.halt_after is not None):  # the request's own policy
            spec, halt_after = ov.policy or "observe", ov.halt_after
        else:
            spec, halt_after = default_policy, default_halt_after
        bundle = bundles.get(spec)
        if bundle is not None:
            if halt_after is not None:
                raise BadRequest("halt_after is a policy of its own; do not combine it with a bundle",
                                 "overthink.halt_after")
            if ov is not None and ov.exit_cue and ov.exit_cue != cfg.exit_cue:
                raise BadRequest(f"the bundle {spec!r} was calibrated with the exit cue {cfg.exit_cue!r}; its "
                                 "guarantee holds for that cue only: drop exit_cue", "overthink.exit_cue")
        else:
            try:
                parse_policy(spec, halt_after, known_keys=known)
            except ValueError as e:
                msg = str(e).replace("--halt-after", "halt_after").replace("--policy", "policy")
                if bundles:
                    msg += f" (or a bundle this server loaded: {', '.join(sorted(bundles))})"
                raise BadRequest(msg, "overthink.policy") from None
        try:
            kind = normalize_kind(ov.answer_kind if ov is not None and ov.answer_kind else "text")
        except ValueError as e:
            raise BadRequest(str(e), "overthink.answer_kind") from None
        cue = ov.exit_cue if ov is not None and ov.exit_cue else cfg.exit_cue or lm.family.exit_cue_for(kind)
        budget = ov.answer_max_tokens if ov is not None and ov.answer_max_tokens else cfg.answer_budget(kind)
        n_prompt = len(lm.tokenizer.encode(prompt, add_special_tokens=False))
        max_tokens = req.token_limit or cfg.max_new_tokens
        try:
            check_budget(limits, max_tokens, budget, prompt_tokens=n_prompt,
                         exit_tokens=len(lm.tokenizer.encode(cue, add_special_tokens=False)), flag="max_tokens")
        except ValueError as e:
            raise BadRequest(str(e), "max_tokens") from None
        try:
            logprobs = req.logprob_count
        except ValueError as e:
            raise BadRequest(str(e), "top_logprobs") from None
        temperature = req.temperature
        do_sample = temperature is not None and temperature > 0
        return Job(prompt=prompt, prompt_tokens=n_prompt, task=Task(kind, cue, budget),
                   policy=(lambda: bundle) if bundle is not None else (lambda: parse_policy(spec, halt_after)),
                   policy_name=spec if halt_after is None else f"halt-after:{halt_after}", max_tokens=max_tokens, do_sample=do_sample,
                   temperature=temperature if do_sample else None, top_p=req.top_p if do_sample else None,
                   seed=req.seed, stops=req.stop, question=question, logprobs=logprobs,
                   ids_as_tokens=req.return_tokens_as_token_ids)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        msgs = req.chat()
        try:
            prompt = lm.family.build_prompt(lm.tokenizer, messages=msgs, kind="text")
        except ValueError as e:
            raise BadRequest(str(e), "messages") from None
        question = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        return await respond(req, request, make_job(req, prompt, question), chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        text = req.text()
        return await respond(req, request, make_job(req, text, text), chat=False)

    async def respond(req: ChatRequest | CompletionRequest, request: Request, job: Job, chat: bool) -> Any:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
        job.on_piece = _handoff(loop, queue)
        split = TextSplit(lm.family.think_end if chat else None)  # text completions: the raw text
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            fut = asyncio.wrap_future(engine.submit(job))
        except RuntimeError as e:
            raise BadRequest(str(e), None, 503, "service_unavailable") from None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(job, fut, queue, split, rid, chat, include_usage),
                                     media_type="text/event-stream")
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            res = await fut
        except asyncio.CancelledError:
            job.cancel()
            raise
        except Exception as e:  # the generation failed (the model, or the upstream in proxy mode)
            raise BadRequest(f"generation failed: {e}", None, 502, "server_error") from None
        finally:
            watcher.cancel()
        reasoning, content, entries = [], [], []
        while not queue.empty():
            text, phase, entry = queue.get_nowait()
            r, c = split.feed(text, phase)
            reasoning.append(r)
            content.append(c)
            if entry is not None:
                entries.append(entry)
        r, c = split.flush()
        reasoning.append(r)
        content.append(c)
        body = final_body(res, rid, chat, "".join(reasoning), "".join(content), split)
        if job.logprobs is not None:
            body["choices"][0]["logprobs"] = _logprobs(entries, chat)
        return JSONResponse(body)

    async def stream(job: Job, fut: asyncio.Future, queue: asyncio.Queue, split: TextSplit, rid: str, chat: bool,
                     include_usage: bool) -> AsyncIterator[bytes]:
        done = False
        try:
            if chat:
                yield _sse(_chunk(rid, model_name, created, {"role": "assistant", "content": ""}, None, chat))
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, fut}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    while not queue.empty():
                        for b in _deltas(split, queue.get_nowait(), rid, chat):
                            yield b
                    break
                for b in _deltas(split, getter.result(), rid, chat):
                    yield b
            for b in _deltas(split, None, rid, chat):
                yield b
            try:
                res = fut.result()
            except Exception as e:  # the generation failed mid-stream: say so in the stream, then end it
                yield _sse(error_body(f"generation failed: {e}", None, "server_error"))
                yield b"data: [DONE]\n\n"
                done = True
                return
            body = final_body(res, rid, chat, "", "", split)
            choice = body["choices"][0]
            last = _chunk(rid, model_name, created, {} if chat else "", choice["finish_reason"], chat)
            last["overthink"] = body["overthink"]
            if include_usage:
                last["usage"] = body["usage"]
            yield _sse(last)
            yield b"data: [DONE]\n\n"
            done = True
        finally:
            if not done:  # the client went away (or the request failed): stop generating for it
                job.cancel()

    def _deltas(split: TextSplit, item: tuple[str, str, Any] | None, rid: str, chat: bool) -> list[bytes]:
        """The chunks for one generated piece (None: the held-back end); a token's log-probabilities ride on the
        chunk of its text (a chunk with no text when the text is held back)."""
        if item is None:
            (reasoning, content), entry = split.flush(), None
        else:
            (reasoning, content), entry = split.feed(item[0], item[1]), item[2]
        lp = None if entry is None else _logprobs([entry], chat)
        out = []
        if chat:
            deltas = [d for d in ({"reasoning_content": reasoning} if reasoning else None,
                                  {"content": content} if content else None) if d]
            if not deltas and lp is not None:
                deltas = [{}]
            for i, d in enumerate(deltas):
                c = _chunk(rid, model_name, created, d, None, chat)
                if lp is not None and i == len(deltas) - 1:
                    c["choices"][0]["logprobs"] = lp
                out.append(_sse(c))
        elif reasoning or content or lp is not None:
            c = _chunk(rid, model_name, created, reasoning + content, None, chat)
            c["choices"][0]["logprobs"] = lp
            out.append(_sse(c))
        return out

    def final_body(res: JobResult, rid: str, chat: bool, reasoning: str, content: str, split: TextSplit) -> dict:
        tr = res.trace
        acc = dict(tr.accounting)
        finish = finish_reason(res)
        halted_at = next((p for p in tr.decision_points if p.get("action") == "halt"), None)
        ov = {"halted": bool(tr.decision["halted"]), "stop_reason": _stop_words(res), "policy": tr.decision["policy"],
              "decision_point": None if halted_at is None else
              {k: halted_at.get(k) for k in ("index", "kind", "label", "ordinal", "score", "threshold")},
              "accounting": {k: int(acc.get(k, 0)) for k in ("reasoning", "forced", "answer", "probe")},
              "trace_id": tr.id}
        completion = generated_tokens(ov["accounting"], probe=False)
        usage = {"prompt_tokens": int(acc.get("prompt", 0)), "completion_tokens": completion,
                 "total_tokens": int(acc.get("prompt", 0)) + completion,
                 "completion_tokens_details": {"reasoning_tokens": ov["accounting"]["reasoning"],
                                               "probe_tokens": ov["accounting"]["probe"]}}
        if chat:
            has_reasoning = split.marker is not None
            message = {"role": "assistant", "content": content,
                       "reasoning_content": reasoning if has_reasoning else None}
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": reasoning + content, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
                "usage": usage, "overthink": ov}

    return app


def finish_reason(res: JobResult) -> str:
    """stop | length | halted (see the module docstring)."""
    if res.stopped_by is not None:
        return "stop"
    if res.trace.decision["halted"] and not res.result.stop_reason.startswith("reasoning budget"):
        return FINISH_HALTED
    reason = res.result.stop_reason
    if reason.startswith("reasoning budget") or reason.startswith("max_new_tokens"):
        return "length"
    return "stop"


def _stop_words(res: JobResult) -> str:
    if res.stopped_by is not None:
        return f"stop string {res.stopped_by!r} reached"
    d = res.trace.decision
    return str(d.get("reason") or res.result.stop_reason)


def _logprobs(entries: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    """Log-probability entries in OpenAI's shape: chat `{"content": [{token, logprob, bytes, top_logprobs}]}`,
    text completions `{tokens, token_logprobs, top_logprobs, text_offset}`."""
    if chat:
        return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode()),
                             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                              for t, v in e["top"]]} for e in entries]}
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}


def _handoff(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[str, str, Any], None]:
    """`Job.on_piece` for a response: pieces from the engine's thread go to `queue` on the server's loop, with ONE
    wake-up of that loop per burst (not one per token: each `call_soon_threadsafe` writes to the loop's pipe)."""
    pending: collections.deque = collections.deque()
    scheduled = [False]

    def move() -> None:
        scheduled[0] = False  # first: a piece appended from here on schedules the next move
        while pending:
            queue.put_nowait(pending.popleft())

    def on_piece(text: str, phase: str, entry: Any) -> None:
        pending.append((text, phase, entry))
        if not scheduled[0]:
            scheduled[0] = True
            loop.call_soon_threadsafe(move)
    return on_piece


async def _watch_disconnect(request: Request, job: Job) -> None:
    while True:
        await asyncio.sleep(0.2)
        if await request.is_disconnected():
            job.cancel()
            return


def _chunk(rid: str, model: str, created: int, delta: dict[str, Any] | str, finish: str | None,
           chat: bool) -> dict[str, Any]:
    if chat:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}]}


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


__all__ = ["create_app", "TextSplit", "finish_reason", "FINISH_HALTED"]
