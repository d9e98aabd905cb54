"""The seed's stack, for comparison: FastAPI + uvicorn streaming a run of the test model with StreamingResponse.

Same route, body, event protocol and test-model pacing options as agentd (see DESIGN.md); no store and no auth, so
whatever it costs is the stack's own cost. Run: uvicorn app:app --host 127.0.0.1 --port 8091
"""

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

app = FastAPI()
WORDS = ["Agents", "answer", "in", "small", "pieces", "so", "the", "reader", "sees", "progress", "right", "away."]


def parse_model(model: str):
    options = {"deltas": 8, "delay_ms": 0, "fail_after": None}
    provider, _, rest = model.partition(":")
    if provider != "test":
        raise ValueError(f"unknown model {model!r}")
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        if key not in options:
            raise ValueError(f"unknown option {key!r}")
        options[key] = int(value)
    return options


@app.get("/readyz")
async def ready():
    return {"status": "ready"}


@app.post("/agents/chats/{chat_id}/stream")
async def stream(chat_id: str, request: Request):
    body = await request.json()
    question = body.get("question")
    if not isinstance(question, str) or not 1 <= len(question) <= 2000:
        return JSONResponse({"detail": [{"loc": ["body", "question"], "msg": "invalid"}]}, status_code=422)
    try:
        options = parse_model(body.get("model") or "test")
    except ValueError as error:
        return JSONResponse({"detail": [{"loc": ["body", "model"], "msg": str(error)}]}, status_code=422)
    run_id = str(uuid.uuid4())

    async def events():
        started = time.monotonic()
        seq = 0

        def event(payload):
            nonlocal seq
            seq += 1
            return f"id: {run_id}:{seq}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

        yield event({"type": "run_started", "chat_id": chat_id, "run_id": run_id, "model": body.get("model") or "test",
                     "canvas_id": None})
        output = []
        for i in range(options["deltas"]):
            if options["fail_after"] == i:
                yield event({"type": "run_failed", "error": f"the test model failed after {i} deltas"})
                yield event({"type": "done"})
                return
            if options["delay_ms"]:
                await asyncio.sleep(options["delay_ms"] / 1000)
            text = WORDS[i % len(WORDS)] if i == 0 else " " + WORDS[i % len(WORDS)]
            output.append(text)
            yield event({"type": "model_delta", "content": text})
        usage = {"input_tokens": len(question.split()), "output_tokens": options["deltas"]}
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        yield event({"type": "final_answer", "output": "".join(output), "usage": usage})
        yield event({"type": "run_completed", "elapsed_ms": int((time.monotonic() - started) * 1000)})
        yield event({"type": "done"})

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
