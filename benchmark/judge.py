# See benchmark/README.md "Judging with a GPT model" for how to use it.
"""Win rates of policy summaries over the human reference summaries, judged by a chat model (the paper's metric).

    export OPENAI_API_KEY=...
    python benchmark/judge.py runs/sft/eval_validation.jsonl runs/ppo/eval_validation.jsonl \
        runs/dpo/eval_validation.jsonl --model gpt-4o-mini --limit 500 --out benchmark/results/judge.json

Any OpenAI-compatible server works (--base-url http://127.0.0.1:8000/v1 for a local one; a localhost server may
run without a key). Each table is a JSONL evaluation table with the columns id, query (the prompt ending in
"TL;DR:"), response (the policy's summary) and reference (the human summary). For every row the judge sees the
post and the two summaries in a seeded random A/B order and must answer with a line `Preferred: A` or
`Preferred: B`; any other answer is counted as unparseable and left out of the rate, never guessed.
Prints one line per table and writes --out (the summary) and {out stem}_judgements.jsonl (one row per example).
Standard library only.
"""

import argparse
import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

# The N+ paper's judge prompt (the DPO paper's TL;DR prompt), verbatim.
TEMPLATE = """Which of the following summaries does a better job of summarizing the most important points in the given forum post, without including unimportant or irrelevant details? Judge based on accuracy, coverage, and coherence.

### Post:
{post}

### Summary A:
{summary_a}

### Summary B:
{summary_b}

### Instructions:
FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. SECOND, on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">
"""
REQUIRED_COLUMNS = ("id", "query", "response", "reference")
QUERY_SUFFIX = "TL;DR:"
PREFERRED_LINE = re.compile(r'^Preferred:\s*"?([AB])"?\s*$')
RETRY_STATUS = {429, 500, 502, 503, 504}  # rate limit and server errors; any other HTTP error is a mistake to report
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


def load_table(path, limit=None):
    """Rows of a JSONL evaluation table (the first `limit`), checked for the columns the judge reads."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such evaluation table")
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if limit is not None and len(rows) == limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not a JSON object ({e})") from None
            for column in REQUIRED_COLUMNS:
                if column not in row:
                    needs = ", ".join(REQUIRED_COLUMNS)
                    raise ValueError(f"{path}:{line_number}: missing column '{column}' (needs {needs})")
                if column != "id" and not isinstance(row[column], str):
                    raise ValueError(f"{path}:{line_number}: column '{column}' must be a string, got {row[column]!r}")
            if not row["query"].rstrip().endswith(QUERY_SUFFIX):
                raise ValueError(f"{path}:{line_number}: column 'query' must end with '{QUERY_SUFFIX}' "
                                 f"(id {row['id']!r})")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty evaluation table")
    return rows


def post_of(query):
    """The forum post the judge sees: the query without its trailing "TL;DR:"."""
    return query.rstrip()[: -len(QUERY_SUFFIX)].strip()


def ab_order(n, seed):
    """For each of n rows, whether the policy's response is shown as A; seeded, so a rerun shows the same order."""
    rng = random.Random(seed)
    return [rng.random() < 0.5 for _ in range(n)]


def build_prompt(row, response_is_a):
    response, reference = row["response"].strip(), row["reference"].strip()
    summary_a, summary_b = (response, reference) if response_is_a else (reference, response)
    return TEMPLATE.format(post=post_of(row["query"]), summary_a=summary_a, summary_b=summary_b)


def parse_preference(answer):
    """'A' or 'B' when exactly one line starts with "Preferred:" and it matches PREFERRED_LINE; else None."""
    lines = [line for line in answer.splitlines() if line.lstrip().startswith("Preferred:")]
    match = PREFERRED_LINE.match(lines[0]) if len(lines) == 1 else None
    return match.group(1) if match else None


def is_local(base_url):
    return urlparse(base_url).hostname in LOCAL_HOSTS


def chat_completion(prompt, base_url, api_key, model, max_tokens, timeout, max_retries, retry_wait):
    """The answer text of one chat completion; retries 429/5xx/timeouts up to max_retries times, waiting
    retry_wait, 2 * retry_wait, ... seconds; raises RuntimeError when the retries are spent or on any other error."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "temperature": 0, "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    url = base_url.rstrip("/") + "/chat/completions"
    for attempt in range(max_retries + 1):
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                payload = json.loads(reply.read())
            break
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            if e.code not in RETRY_STATUS:
                raise RuntimeError(f"POST {url}: HTTP {e.code}: {detail}") from None
            error = f"HTTP {e.code}: {detail}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            error = repr(getattr(e, "reason", e))
        except json.JSONDecodeError as e:
            raise RuntimeError(f"POST {url}: the reply is not JSON ({e})") from None
        if attempt == max_retries:
            raise RuntimeError(f"POST {url}: failed {max_retries + 1} times, last error: {error}")
        time.sleep(retry_wait * 2**attempt)
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise RuntimeError(f"POST {url}: no choices[0].message.content in the reply {str(payload)[:300]}") from None
    return content or ""  # a refusal or filtered answer (content null) is judged unparseable, not dropped


def judge_rows(rows, seed, workers, **client):
    """One judgement per row, in row order: the A/B order, the raw answer, the parsed choice and the winner."""
    order = ab_order(len(rows), seed)
    prompts = [build_prompt(row, response_is_a) for row, response_is_a in zip(rows, order)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(chat_completion, prompt, **client) for prompt in prompts]
        try:
            answers = [future.result() for future in futures]
        except BaseException:
            for future in futures:  # one failed request stops the table instead of paying for the rest
                future.cancel()
            raise
    judgements = []
    for row, response_is_a, answer in zip(rows, order, answers):
        preferred = parse_preference(answer)
        winner = None if preferred is None else "response" if (preferred == "A") == response_is_a else "reference"
        judgements.append(dict(id=row["id"], response_is_a=response_is_a, preferred=preferred, winner=winner,
                               answer=answer))
    return judgements


def summarize(judgements):
    """Counts and the win rate of the response over the reference; unparseable answers are excluded from the rate.
    There are no ties: the format makes the judge pick A or B."""
    wins = sum(j["winner"] == "response" for j in judgements)
    losses = sum(j["winner"] == "reference" for j in judgements)
    unparseable = sum(j["winner"] is None for j in judgements)
    win_rate = wins / (wins + losses) if wins + losses else None
    return dict(n=len(judgements), wins=wins, losses=losses, unparseable=unparseable, win_rate=win_rate)


def judgements_path(out):
    return os.path.splitext(out)[0] + "_judgements.jsonl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tables", nargs="+", help="evaluation tables (JSONL with id, query, response, reference)")
    parser.add_argument("--out", required=True, help="JSON summary to write; per-example judgements go to "
                        "{out without extension}_judgements.jsonl")
    parser.add_argument("--model", default="gpt-4o-mini", help="judge model name sent to the API")
    parser.add_argument("--base-url", default="https://api.openai.com/v1",
                        help="OpenAI-compatible API root; requests go to {base-url}/chat/completions")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the API key (may be unset for a localhost --base-url)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random A/B order (same for every table)")
    parser.add_argument("--limit", type=int, default=None, help="judge only the first N rows of each table (rows)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent requests (threads)")
    parser.add_argument("--max-tokens", type=int, default=256, help="answer length limit (tokens)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (seconds)")
    parser.add_argument("--max-retries", type=int, default=3,
                        help="retries of a request after a 429, 5xx, timeout or connection error")
    parser.add_argument("--retry-wait", type=float, default=2.0,
                        help="wait before the first retry (seconds); doubles on each further retry")
    args = parser.parse_args(argv)
    for name in ("workers", "max_tokens", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_retries < 0 or args.timeout <= 0 or args.retry_wait < 0:
        parser.error("--max-retries and --retry-wait must be >= 0 and --timeout > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    # every check before the first request: a failure after paid requests would waste them
    api_key = os.environ.get(args.api_key_env, "")
    if not api_key and not is_local(args.base_url):
        raise SystemExit(f"error: set the API key in ${args.api_key_env} (or choose the variable with --api-key-env)")
    try:
        tables = {path: load_table(path, args.limit) for path in args.tables}
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    client = dict(base_url=args.base_url, api_key=api_key, model=args.model, max_tokens=args.max_tokens,
                  timeout=args.timeout, max_retries=args.max_retries, retry_wait=args.retry_wait)

    results, all_judgements = [], []
    for path, rows in tables.items():
        try:
            judgements = judge_rows(rows, args.seed, args.workers, **client)
        except RuntimeError as e:
            raise SystemExit(f"error: {path}: {e}")
        summary = dict(table=path, **summarize(judgements))
        results.append(summary)
        all_judgements += [dict(table=path, **j) for j in judgements]
        rate = "n/a" if summary["win_rate"] is None else f"{summary['win_rate']:.3f}"
        print(f"{path}: n={summary['n']} wins={summary['wins']} losses={summary['losses']} "
              f"unparseable={summary['unparseable']} win_rate={rate}", flush=True)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=args.model, base_url=args.base_url, seed=args.seed, limit=args.limit,
                       judgements=judgements_path(args.out), tables=results), f, indent=2)
    with open(judgements_path(args.out), "w") as f:
        f.writelines(json.dumps(j) + "\n" for j in all_judgements)
    return results


if __name__ == "__main__":
    main()
