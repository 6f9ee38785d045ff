"""benchmark/judge.py against a local OpenAI-compatible server on 127.0.0.1 that judges deterministically."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import judge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmark", "judge.py")
SECTION = re.compile(r"### Post:\n(.*)\n\n### Summary A:\n(.*)\n\n### Summary B:\n(.*)\n\n### Instructions:", re.S)


class FakeJudge(BaseHTTPRequestHandler):
    """Prefers the summary containing GOOD. Posts with a marker misbehave: MALFORMED gets an answer without a valid
    Preferred line, FLAKY a 500 on its first request, SLOW a reply after the client's timeout on its first request,
    DOWN a 503 every time, DENIED a 401."""

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        post, summary_a, summary_b = SECTION.search(body["messages"][0]["content"]).groups()
        with server.lock:
            server.requests.append(dict(path=self.path, auth=self.headers.get("Authorization"), body=body,
                                        post=post, a=summary_a, b=summary_b))
            first = post not in server.seen
            server.seen.add(post)
        if "DENIED" in post:
            return self.reply(401, {"error": {"message": "invalid api key"}})
        if "DOWN" in post or ("FLAKY" in post and first):
            return self.reply(503 if "DOWN" in post else 500, {"error": {"message": "try again"}})
        if "SLOW" in post and first:
            time.sleep(0.6)
        if "MALFORMED" in post:
            content = "Comparison: both are fine.\nPreferred: A or B"
        else:
            content = f"Comparison: one mentions the key point.\nPreferred: {'A' if 'GOOD' in summary_a else 'B'}"
        self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

    def reply(self, status, payload):
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a SLOW reply
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    httpd.daemon_threads = True
    httpd.lock, httpd.requests, httpd.seen = threading.Lock(), [], set()
    thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def row(i, response, reference, marker=""):
    query = f"SUBREDDIT: r/test\n\nTITLE: post {i}\n\nPOST: story number {i} {marker}\n\nTL;DR:"
    return dict(id=f"t{i}", query=query, response=" " + response, reference=" " + reference, extra=i)


# 5 wins, 3 losses, 1 unparseable, 1 win after a 500: win rate 6 / 9, the unparseable one left out
ROWS = ([row(i, f"GOOD summary {i}", f"plain summary {i}") for i in range(5)]
        + [row(i, f"plain summary {i}", f"GOOD summary {i}") for i in range(5, 8)]
        + [row(8, "GOOD summary 8", "plain summary 8", "MALFORMED"), row(9, "GOOD summary 9", "plain 9", "FLAKY")])


def write_table(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def client(server, **overrides):
    kwargs = dict(base_url=server.base_url, api_key="test-key", model="judge-model", max_tokens=64, timeout=5.0,
                  max_retries=2, retry_wait=0.01)
    return {**kwargs, **overrides}


def test_parse_preference_is_strict():
    assert judge.parse_preference("Comparison: x.\nPreferred: A") == "A"
    assert judge.parse_preference('Comparison: x.\nPreferred: "B"  \n') == "B"
    assert judge.parse_preference("Comparison: x.\r\nPreferred:B") == "B"
    for answer in ["Comparison: x.\nPreferred: a", "Preferred: A or B", "Preferred: C", "A", "", "Preferred:",
                   "Comparison: x.\nPreferred: A\nPreferred: B", "Preferred: A\nPreferred: A", "**Preferred:** A",
                   "  Preferred: A", "Comparison: x. Preferred: A", "Preferred: A."]:
        assert judge.parse_preference(answer) is None, answer


def test_prompt_and_order():
    r = row(1, "resp", "ref")
    prompt = judge.build_prompt(r, response_is_a=True)
    post, a, b = SECTION.search(prompt).groups()
    assert post == "SUBREDDIT: r/test\n\nTITLE: post 1\n\nPOST: story number 1" and (a, b) == ("resp", "ref")
    assert SECTION.search(judge.build_prompt(r, response_is_a=False)).groups()[1:] == ("ref", "resp")
    assert prompt.startswith("Which of the following summaries does a better job")
    assert prompt.endswith('Comparison: <one-sentence comparison and explanation>\nPreferred: <"A" or "B">\n')
    order = judge.ab_order(200, seed=1)
    assert order == judge.ab_order(200, seed=1) and order != judge.ab_order(200, seed=2)
    assert 60 < sum(order) < 140  # both positions used, about half each


def test_protocol_win_rate_and_retry(server):
    rows = ROWS
    judgements = judge.judge_rows(rows, seed=3, workers=3, **client(server))
    order = judge.ab_order(len(rows), seed=3)
    assert True in order and False in order
    assert [j["response_is_a"] for j in judgements] == order
    assert [j["id"] for j in judgements] == [r["id"] for r in rows]

    # 11 requests: one per row plus the retry of FLAKY after its 500
    assert len(server.requests) == 11 and sum("FLAKY" in q["post"] for q in server.requests) == 2
    for q in server.requests:
        assert q["path"] == "/v1/chat/completions" and q["auth"] == "Bearer test-key"
        assert set(q["body"]) == {"model", "messages", "temperature", "max_tokens"}
        assert (q["body"]["model"], q["body"]["temperature"], q["body"]["max_tokens"]) == ("judge-model", 0, 64)
        assert [m["role"] for m in q["body"]["messages"]] == ["user"]
    # the server saw the response as A exactly where the judge recorded it, and the winner is mapped back
    by_post = {q["post"]: q for q in server.requests}
    for r, j in zip(rows, judgements):
        q = by_post[judge.post_of(r["query"])]
        response, reference = r["response"].strip(), r["reference"].strip()
        assert (q["a"], q["b"]) == ((response, reference) if j["response_is_a"] else (reference, response))
        if "MALFORMED" in r["query"]:
            assert j["preferred"] is None and j["winner"] is None and "A or B" in j["answer"]
        else:
            assert j["preferred"] == ("A" if "GOOD" in q["a"] else "B")
            assert j["winner"] == ("response" if "GOOD" in response else "reference")
    assert judge.summarize(judgements) == dict(n=10, wins=6, losses=3, unparseable=1, win_rate=6 / 9)


def test_timeout_is_retried(server):
    rows = [row(0, "GOOD a", "b", "SLOW")]
    judgements = judge.judge_rows(rows, seed=1, workers=1, **client(server, timeout=0.3))
    assert judgements[0]["winner"] == "response" and len(server.requests) == 2


def test_request_errors(server):
    start = time.time()
    with pytest.raises(RuntimeError, match="failed 3 times.*HTTP 503"):
        judge.judge_rows([row(0, "GOOD a", "b", "DOWN")], seed=1, workers=1, **client(server))
    assert len(server.requests) == 3 and time.time() - start < 2  # bounded: 1 + max_retries attempts
    with pytest.raises(RuntimeError, match="HTTP 401"):
        judge.judge_rows([row(1, "GOOD a", "b", "DENIED")], seed=1, workers=1, **client(server))
    assert len(server.requests) == 4  # a 401 is not retried


def test_bad_tables(tmp_path):
    bad = dict(ROWS[0])
    del bad["reference"]
    with pytest.raises(ValueError, match="missing column 'reference'"):
        judge.load_table(write_table(tmp_path / "a.jsonl", [ROWS[1], bad]))
    with pytest.raises(ValueError, match="empty evaluation table"):
        judge.load_table(write_table(tmp_path / "b.jsonl", []))
    with pytest.raises(ValueError, match="'query' must end with 'TL;DR:'"):
        judge.load_table(write_table(tmp_path / "c.jsonl", [dict(ROWS[0], query="no suffix")]))
    with pytest.raises(ValueError, match="'response' must be a string"):
        judge.load_table(write_table(tmp_path / "d.jsonl", [dict(ROWS[0], response=None)]))
    assert [r["id"] for r in judge.load_table(write_table(tmp_path / "e.jsonl", ROWS), limit=3)] == ["t0", "t1", "t2"]


def run_cli(args, env_key=None):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "JUDGE_KEY")}
    env.update(env_key or {})
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=60)


def test_cli(server, tmp_path):
    sft = write_table(tmp_path / "sft.jsonl", ROWS)
    ppo = write_table(tmp_path / "ppo.jsonl", [row(20 + i, f"GOOD {i}", f"plain {i}") for i in range(4)]
                      + [row(30, "plain", "GOOD")])
    out = tmp_path / "results" / "judge.json"
    result = run_cli([sft, ppo, "--out", str(out), "--base-url", server.base_url, "--api-key-env", "JUDGE_KEY",
                      "--model", "m", "--retry-wait", "0.01", "--workers", "2"], {"JUDGE_KEY": "k2"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == [f"{sft}: n=10 wins=6 losses=3 unparseable=1 win_rate=0.667",
                     f"{ppo}: n=5 wins=4 losses=1 unparseable=0 win_rate=0.800"]
    summary = json.loads(out.read_text())
    counts = [(t["table"], t["wins"], t["losses"], t["unparseable"]) for t in summary["tables"]]
    assert counts == [(sft, 6, 3, 1), (ppo, 4, 1, 0)]
    judgements = [json.loads(line) for line in open(tmp_path / "results" / "judge_judgements.jsonl")]
    assert summary["judgements"] == str(tmp_path / "results" / "judge_judgements.jsonl") and len(judgements) == 15
    assert all(q["auth"] == "Bearer k2" and q["body"]["model"] == "m" for q in server.requests)

    # --limit, and a localhost server needs no key (no Authorization header then)
    server.requests.clear()
    result = run_cli([sft, "--out", str(tmp_path / "l.json"), "--base-url", server.base_url, "--limit", "3"])
    assert result.returncode == 0, result.stderr
    assert "n=3 wins=3 losses=0" in result.stdout and [q["auth"] for q in server.requests] == [None] * 3


def test_cli_errors(server, tmp_path):
    good = write_table(tmp_path / "good.jsonl", ROWS)
    no_column = write_table(tmp_path / "bad.jsonl", [{k: v for k, v in ROWS[0].items() if k != "query"}])
    out = str(tmp_path / "o.json")
    # no key for a remote API: an error before any request (the .invalid host would fail to resolve anyway)
    result = run_cli([good, "--out", out, "--base-url", "https://api.example.invalid/v1"])
    assert result.returncode != 0 and "$OPENAI_API_KEY" in result.stderr
    # a bad second table is reported before the first is judged
    result = run_cli([good, no_column, "--out", out, "--base-url", server.base_url])
    assert result.returncode != 0 and "missing column 'query'" in result.stderr and "bad.jsonl" in result.stderr
    assert server.requests == [] and not os.path.exists(out)
    result = run_cli([str(tmp_path / "nope.jsonl"), "--out", out, "--base-url", server.base_url])
    assert result.returncode != 0 and "no such evaluation table" in result.stderr
    result = run_cli([good, "--out", out, "--workers", "0"])
    assert result.returncode != 0 and "--workers must be >= 1" in result.stderr
