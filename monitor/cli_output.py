"""What `overthink run` prints: the progress bar (tokens/s, questions done, ETA; on stderr), one trace's answer,
stop reason and token accounting, a batch summary, and the `--compare` table; `brief` is a trace in `--json`.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from monitor.cli_args import err_console

console = Console(stderr=False)


class TokenProgress:
    """The run's progress bar: tokens decoded against the token budget of every question (reasoning cap + answer
    budget; twice with --compare), tokens/s, questions done, elapsed time and ETA; updated at every decoding step.
    A finished question's unused budget is counted as done, so the bar ends full and the ETA follows the real rate."""

    def __init__(self, problems: list[dict[str, Any]], cfg: Any) -> None:
        from monitor.tasks import problem_kind

        self.runs = 2 if cfg.compare else 1
        # per question, in order (traces come back in problem order)
        self.budget = [cfg.max_new_tokens + cfg.answer_budget(problem_kind(cfg.answer_kind, p)) for p in problems]
        self.n, self.finished, self.decoded = len(problems), 0, 0
        self.bar = Progress(TextColumn("[bold]generating"), BarColumn(), TextColumn("{task.fields[questions]}"),
                            TextColumn("{task.fields[rate]}"), TextColumn("eta"), TimeRemainingColumn(),
                            TimeElapsedColumn(), console=err_console, transient=False)
        self.task = self.bar.add_task("run", total=self.runs * sum(self.budget),
                                      questions=f"0/{self.n} questions", rate="")

    def __enter__(self) -> TokenProgress:
        self.t0 = time.perf_counter()
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def tokens(self, n: int) -> None:
        self.decoded += n
        rate = self.decoded / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, advance=n, rate=f"{rate:.1f} tok/s")

    def done(self, traces: list[Any]) -> None:
        from monitor.trace import generated_tokens

        for t in traces:
            used = generated_tokens(t.accounting, probe=False) + int(t.meta.get("unmonitored_tokens") or 0)
            budget = self.budget[self.finished] if self.finished < len(self.budget) else 0
            self.finished += 1
            self.bar.update(self.task, advance=max(0, self.runs * budget - used),
                            questions=f"{self.finished}/{self.n} questions")


def brief(t: Any) -> dict[str, Any]:
    from monitor.report.data import comparison

    out = {"id": t.id, "answer": t.answer, "gold": t.gold, "correct": t.correct, "decision": t.decision,
           "accounting": t.accounting}
    c = comparison(t)
    if c is not None:
        out["compare"] = c
    return out


def print_comparison(traces: list[Any], summary: dict[str, Any]) -> None:
    """Per question: the monitored and unmonitored answers, tokens each used and saved, and why it stopped."""
    from monitor.report.data import comparison, short_stop

    table = Table(title="monitored vs unmonitored, same seed (tokens: reasoning + exit cue + answer + probe)")
    for col, just in (("id", "left"), ("answer", "left"), ("unmonitored", "left"), ("gold", "left"),
                      ("tokens", "right"), ("unmon.", "right"), ("saved", "right"), ("stop", "left")):
        table.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]

    def ans(a: Any, ok: Any) -> str:
        text = " ".join(str(a).split())
        text = text if len(text) <= 16 else text[:15] + "…"
        return text + ("" if ok is None else (" ✓" if ok else " ✗"))

    for t in traces:
        c = comparison(t)
        if c is None:
            continue
        changed = " (changed)" if c["answer_changed"] else ""
        stop = short_stop(t)
        table.add_row(str(t.id), ans(t.answer, t.correct) + changed, ans(c["unmonitored_answer"],
                      c["unmonitored_correct"]), "" if t.gold is None else str(t.gold), str(c["monitored_tokens"]),
                      str(c["unmonitored_tokens"]), str(c["saved_tokens"]), stop)
    console.print(table)
    s = summary.get("compare")
    if s:
        pct = s["tokens_saved"] / s["unmonitored_tokens"] if s["unmonitored_tokens"] else 0.0
        accs = ("" if s["accuracy_monitored"] is None else
                f"; accuracy monitored {s['accuracy_monitored']:.2f} vs unmonitored {s['accuracy_unmonitored']:.2f}")
        console.print(f"[bold]tokens saved:[/bold] {s['tokens_saved']} of {s['unmonitored_tokens']} ({pct:.1%}); "
                      f"answers changed: {s['answers_changed']} of {s['n']}{accs}", soft_wrap=True)


def print_one(t: Any) -> None:
    console.rule(f"[bold]{t.model}[/bold]  {t.id}")
    reasoning = "".join(x for x, ph in zip(t.tokens["text"], t.tokens["phase"]) if ph == "reasoning")
    console.print("[dim]reasoning:[/dim]")
    console.print(reasoning.strip(), markup=False, highlight=False)
    console.print("[dim]after reasoning:[/dim]")
    console.print(t.answer_text.strip() or "(nothing)", markup=False, highlight=False)
    console.print(f"[bold]answer:[/bold] {t.answer!s}" + (f"   gold: {t.gold}  correct: {t.correct}"
                                                         if t.gold is not None else ""))
    why = ("halted: " if t.decision["halted"] else "not halted: ") + t.decision["reason"]
    console.print(f"[bold]stop:[/bold] {why}  [dim](policy {t.decision['policy']})[/dim]")
    table = Table(title="token accounting")
    for k in ("prompt", "reasoning", "answer", "probe", "forced"):
        table.add_column(k, justify="right")
    table.add_row(*(str(t.accounting[k]) for k in ("prompt", "reasoning", "answer", "probe", "forced")))
    console.print(table)
    if t.errors:
        console.print(f"[yellow]{len(t.errors)} signal error(s) (monitor failed open): "
                      f"{t.errors[0]['signal']}: {t.errors[0]['error']}[/yellow]")


def print_summary(s: dict[str, Any]) -> None:
    table = Table(title=f"summary of {s['n']} traces")
    table.add_column("metric")
    table.add_column("value", justify="right")
    acc = s["accuracy"]
    table.add_row("accuracy", "n/a" if acc is None else f"{acc:.3f} ({s['graded']} graded)")
    table.add_row("halt rate", f"{s['halt_rate']:.3f}")
    for k, v in s["tokens"].items():
        table.add_row(f"mean {k} tokens", f"{v['mean']:.1f}")
    for k, v in s["stop_reasons"].items():
        table.add_row(f"stop: {k}", str(v))
    table.add_row("signal errors", str(s["signal_errors"]))
    console.print(table)
