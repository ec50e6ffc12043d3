"""Talk to `overthink serve` with the official openai client: a monitored answer, and what it cost and saved.

    overthink serve --model smollm2 --port 8000 --trace-log out/serve-traces.jsonl
    python examples/serve_client.py --base-url http://127.0.0.1:8000/v1 --model smollm2
"""

from __future__ import annotations

import argparse

import openai


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--question", default="Natalia sold clips to 48 of her friends in April, and then she sold half "
                                          "as many clips in May. How many clips did Natalia sell altogether?")
    ap.add_argument("--halt-after", type=int, default=96, help="this request's policy: halt after N reasoning tokens")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")
    messages = [{"role": "user", "content": args.question}]
    for name, extra in (("observe", {}), (f"halt-after {args.halt_after}",
                                          {"overthink": {"halt_after": args.halt_after, "answer_kind": "number"}})):
        r = client.chat.completions.create(model=args.model, messages=messages, max_tokens=256, extra_body=extra)
        ov = r.model_extra["overthink"]
        msg = r.choices[0].message
        print(f"--- {name}: finish_reason={r.choices[0].finish_reason}, halted={ov['halted']}")
        print(f"reasoning ({ov['accounting']['reasoning']} tokens): {(msg.model_extra.get('reasoning_content') or '')[:200]!r}")
        print(f"answer ({ov['accounting']['answer']} tokens after {ov['accounting']['forced']} forced): {msg.content!r}")
        print(f"why it stopped: {ov['stop_reason']}; usage: {r.usage.completion_tokens} completion tokens; "
              f"trace {ov['trace_id']}")
    print("streaming:", end=" ", flush=True)
    for chunk in client.chat.completions.create(model=args.model, messages=messages, max_tokens=64, stream=True,
                                                extra_body={"overthink": {"halt_after": 32}}):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.model_extra.get("overthink"):
            print(f"\n[{chunk.choices[0].finish_reason}: {chunk.model_extra['overthink']['stop_reason']}]")


if __name__ == "__main__":
    main()
