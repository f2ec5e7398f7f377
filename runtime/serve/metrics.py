"""Server counters in Prometheus' text exposition format (version 0.0.4): requests by endpoint and
status, prompt and completion tokens, prompt tokens a slot's cache already held, request latency
(a histogram), queue and slot gauges."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable

# Latency bucket bounds in seconds (a small model answers in milliseconds to tens of seconds).
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Counters updated by the request handlers; ``render`` writes the exposition text."""

    def __init__(self, gauges: Callable[[], dict[str, float]]) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.tokens = {"prompt": 0, "completion": 0}
        self.reused = 0
        self.latency: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.gauges = gauges

    def observe(self, endpoint: str, status: int, seconds: float, prompt_tokens: int = 0,
                completion_tokens: int = 0, reused_tokens: int = 0) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1
            self.tokens["prompt"] += prompt_tokens
            self.tokens["completion"] += completion_tokens
            self.reused += reused_tokens
            counts = self.latency[endpoint]
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            self.latency_sum[endpoint] += seconds

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP edgeft_requests_total Requests answered, by endpoint and HTTP status.",
                     "# TYPE edgeft_requests_total counter"]
            lines += [f'edgeft_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP edgeft_tokens_total Tokens processed, by kind (prompt, completion).",
                      "# TYPE edgeft_tokens_total counter"]
            lines += [f'edgeft_tokens_total{{kind="{k}"}} {n}' for k, n in self.tokens.items()]
            lines += ["# HELP edgeft_prompt_tokens_reused_total Prompt tokens a slot's KV cache already held "
                      "(a prefix shared with its previous request), not evaluated again.",
                      "# TYPE edgeft_prompt_tokens_reused_total counter",
                      f"edgeft_prompt_tokens_reused_total {self.reused}"]
            lines += ["# HELP edgeft_request_seconds Request latency (to the last byte of the answer).",
                      "# TYPE edgeft_request_seconds histogram"]
            for endpoint, counts in sorted(self.latency.items()):
                for bound, n in zip(BUCKETS, counts):
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f'edgeft_request_seconds_bucket{{endpoint="{endpoint}",le="{le}"}} {n}')
                lines.append(f'edgeft_request_seconds_sum{{endpoint="{endpoint}"}} {self.latency_sum[endpoint]:.6f}')
                lines.append(f'edgeft_request_seconds_count{{endpoint="{endpoint}"}} {counts[-1]}')
        for name, value in self.gauges().items():
            lines += [f"# TYPE edgeft_{name} gauge", f"edgeft_{name} {value:g}"]
        return "\n".join(lines) + "\n"
