"""Overthink's online side: watch a reasoning model token by token and decide when to stop it.

Data flow (docs/README.md): backend --TokenStep--> Monitor (signals, cues, policy) --Decision--> backend;
Monitor --> Trace (JSON Lines) --> reports and benchmarks.

Where things live:
- events.py       TokenStep (the one event type) and Distribution
- signals/        one file per signal family (path deviation, JSD instability, latent trajectory, redundancy)
- cues.py         decision points: cue words, step ends, end of reasoning
- decision.py     Decision and the halting policies
- monitor.py      Monitor: runs signals (fail-open), cues and the policy for one sequence
- trace.py        Trace record, schema validation, atomic JSON Lines IO (docs/trace-schema.md)
- hf.py           Hugging Face transformers backend
- models.py       model specs (named offline models, GGUF, directories) and reasoning formats
- answers.py      answer extraction and checking (GSM8K numbers, MATH LaTeX, multiple choice)
- run.py / bench.py / cli.py   the `overthink` command and the library calls behind it
"""

from monitor.decision import Decision
from monitor.events import TokenStep
from monitor.monitor import Monitor
from monitor.trace import Trace

__all__ = ["TokenStep", "Trace", "Monitor", "Decision"]
