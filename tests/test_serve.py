"""`nli serve`: its batching, its API against `nli predict` on real pairs, every kind of bad request, an exported
run, Ctrl-C, and the page in a real browser."""
import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as onp
import pytest

import browser
from conftest import DEV_PAIRS, ROOT, run_cli

from nli import serve, snli

PAIRS = 40
PREMISE, HYPOTHESIS = "A man sleeps on a bench in the park.", "A person is awake."


@pytest.fixture(scope="module")
def fine_tuned_run(training_bert_dir, tmp_path_factory):
    """A run of seconds: the tiny BERT fine-tuned one epoch on 64 real pairs."""
    run_dir = tmp_path_factory.mktemp("serve") / "run"
    result = run_cli("finetune", "--model", training_bert_dir, "--train", DEV_PAIRS, "--test", DEV_PAIRS,
                     "--limit-train", 64, "--limit-test", 16, "--epochs", 1, "--batch-size", 16, "--max-len", 48,
                     "--devices", "cpu", "--quiet", "--out", run_dir)
    assert result.returncode == 0, result.stderr
    return str(run_dir)


@pytest.fixture(scope="module")
def real_pairs(tmp_path_factory):
    """The first PAIRS real dev pairs, and a .tsv of them (with a header) for `nli predict --file`."""
    premises, hypotheses, _ = snli.read_pairs(DEV_PAIRS)
    pairs = list(zip(premises[:PAIRS], hypotheses[:PAIRS]))
    path = tmp_path_factory.mktemp("pairs") / "pairs.tsv"
    path.write_text("premise\thypothesis\n" + "".join(f"{p}\t{h}\n" for p, h in pairs), encoding="utf-8")
    return pairs, str(path)


def predict_file(run_dir, path):
    """`nli predict --file`'s records, in order."""
    result = run_cli("predict", "--run", run_dir, "--devices", "cpu", "--file", path, "--quiet")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@contextlib.contextmanager
def serving(run_dir, log_dir, *options):
    """A `nli serve` process on a free loopback port; yields (process, its URL, its stdout and stderr files)."""
    out, err = log_dir / "serve.out", log_dir / "serve.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:  # files: a full pipe would block the server
        process = subprocess.Popen([sys.executable, "-m", "nli", "serve", "--run", run_dir, "--port", "0",
                                    "--devices", "cpu", *options], stdout=stdout, stderr=stderr, cwd=ROOT,
                                   env={**os.environ, "PYTHONPATH": ROOT})
    try:
        deadline = time.monotonic() + 180
        while not (url := re.search(r" at (http://127\.0\.0\.1:\d+/) ", out.read_text())):
            assert process.poll() is None, f"nli serve exited {process.returncode}: {err.read_text()}"
            assert time.monotonic() < deadline, "nli serve printed no URL in 180 s"
            time.sleep(0.1)
        yield process, url.group(1), out, err
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)


def stop(process, out, err):
    """Ctrl-C the server: (its exit status, stdout, stderr)."""
    process.send_signal(signal.SIGINT)
    return process.wait(timeout=60), out.read_text(), err.read_text()


def call(url, path, body=None, content_type="application/json"):
    """(status, parsed JSON or text) of one request: GET without a body, else POST of `body` (bytes or JSON)."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path.lstrip("/"), data=data,
                                     headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, kind, text = response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as e:
        status, kind, text = e.code, e.headers["Content-Type"], e.read().decode()
    return status, json.loads(text) if kind == "application/json" else text


def assert_same_predictions(answers, expected):
    for i, (answer, record) in enumerate(zip(answers, expected, strict=True)):
        assert answer["label"] == record["label"], f"pair {i}"
        for label, p in record["probabilities"].items():
            assert abs(answer["probabilities"][label] - p) < 1e-5, f"pair {i}, {label}"


@pytest.fixture(scope="module")
def server(fine_tuned_run, tmp_path_factory):
    """`nli serve` over the fine-tuned run, shared by the tests of its API."""
    with serving(fine_tuned_run, tmp_path_factory.mktemp("server")) as (_, url, _, _):
        yield url


class RecordingPredictor:
    """Stands in for a Predictor in the batcher's tests: each pair's label is its premise; forward passes are
    recorded, take `seconds`, and fail on a premise "fail"."""

    def __init__(self, seconds=0.05):
        self.passes, self.seconds = [], seconds

    def predict_pairs(self, pairs, tokenized):
        self.passes.append([premise for premise, _ in pairs])
        time.sleep(self.seconds)
        if any(premise == "fail" for premise, _ in pairs):
            raise RuntimeError("forward pass failed")
        return [{"label": premise} for premise, _ in pairs]


def run_batcher(predictor, scenario, max_pairs=8):
    """Run `scenario(batcher)` (a coroutine) against a running `Batcher` over `predictor`; its result."""
    async def main():
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            batcher = serve.Batcher(predictor, executor, max_pairs)
            worker = asyncio.create_task(batcher.run())
            try:
                return await scenario(batcher)
            finally:
                worker.cancel()
    return asyncio.run(main())


def test_requests_that_arrive_together_go_to_the_model_together_within_the_pair_bound():
    predictor = RecordingPredictor()
    sizes = [3, 2, 3, 1, 4, 1]  # at most 6 pairs a pass: 3+2 (a 3 would make 8), 3+1 (a 4 would make 8), 4+1
    jobs = [[(f"{size}.{i}", "h")] * size for i, size in enumerate(sizes)]

    async def scenario(batcher):
        return await asyncio.gather(*(batcher.submit(pairs, False) for pairs in jobs))

    results = run_batcher(predictor, scenario, max_pairs=6)
    assert [len(p) for p in predictor.passes] == [5, 4, 5]
    assert [r["label"] for result in results for r in result] == [p for pairs in jobs for p, _ in pairs]
    assert [len(result) for result in results] == sizes  # each request gets its own answers, in its order
    assert sum(predictor.passes, []) == [p for pairs in jobs for p, _ in pairs]


def test_a_lone_request_waits_only_a_few_milliseconds_and_requests_queued_behind_a_pass_share_the_next():
    predictor = RecordingPredictor(seconds=0.3)

    async def scenario(batcher):
        start = time.monotonic()
        first = asyncio.create_task(batcher.submit([("alone", "h")], False))
        await asyncio.sleep(0.05)  # past the batcher's wait: "alone" is already in its forward pass
        later = [asyncio.create_task(batcher.submit([(f"later{i}", "h")], False)) for i in range(3)]
        await asyncio.gather(first, *later)
        return time.monotonic() - start, batcher.served

    seconds, served = run_batcher(predictor, scenario)
    assert predictor.passes == [["alone"], ["later0", "later1", "later2"]]
    assert served == {"requests": 4, "pairs": 4, "batches": 2}
    assert seconds < 0.6 + 0.3  # two passes of 0.3 s, and the waits of MAX_WAIT


def test_a_failed_pass_fails_only_its_own_requests_and_the_batcher_goes_on():
    predictor = RecordingPredictor(seconds=0.01)

    async def scenario(batcher):
        failed = await asyncio.gather(batcher.submit([("fail", "h")], False), batcher.submit([("x", "h")], False),
                                      return_exceptions=True)
        return failed, await batcher.submit([("after", "h")], False)

    failed, after = run_batcher(predictor, scenario)
    assert all(isinstance(result, RuntimeError) for result in failed)
    assert after == [{"label": "after"}]


def test_answers_equal_nli_predict_on_real_pairs_one_at_a_time_concurrently_and_in_one_request(
        server, fine_tuned_run, real_pairs):
    pairs, path = real_pairs
    expected = predict_file(fine_tuned_run, path)
    probabilities = onp.array([list(r["probabilities"].values()) for r in expected])
    assert probabilities.std(axis=0).min() > 1e-3  # the pairs' answers differ: a mix-up would show
    _, before = call(server, "/api/health")
    with concurrent.futures.ThreadPoolExecutor(32) as clients:
        answers = list(clients.map(lambda pair: call(server, "/api/predict", dict(zip(("premise", "hypothesis"),
                                                                                      pair))), pairs))
    assert all(status == 200 for status, _ in answers)
    assert_same_predictions([answer for _, answer in answers], expected)
    status, together = call(server, "/api/predict", {"pairs": [list(pair) for pair in pairs]})
    assert status == 200
    assert_same_predictions(together["predictions"], expected)
    _, after = call(server, "/api/health")
    served = {key: after["served"][key] - before["served"][key] for key in before["served"]}
    assert served["requests"] == PAIRS + 1 and served["pairs"] == 2 * PAIRS
    assert served["batches"] < PAIRS + 1  # concurrent requests were batched


BAD_REQUESTS = {  # what is wrong: (path, body, content type, status, the error's words)
    "invalid JSON": ("/api/predict", b'{"premise": "A dog."', "application/json", 400, "not valid JSON"),
    "empty body": ("/api/predict", b"", "application/json", 400, "The body is empty"),
    "wrong content type": ("/api/predict", b'{"premise": "a", "hypothesis": "b"}', "text/plain", 415,
                           "Content-Type: application/json"),
    "a form's content type": ("/api/attention", b'{"premise": "a", "hypothesis": "b"}', None, 415,
                              "not application/x-www-form-urlencoded"),
    "missing field": ("/api/predict", {"premise": PREMISE}, "application/json", 422, "hypothesis is missing"),
    "unknown field": ("/api/predict", {"premise": PREMISE, "hypothesis": HYPOTHESIS, "hypotesis": "x"},
                      "application/json", 422, "Unknown field 'hypotesis'"),
    "a number for a text": ("/api/predict", {"premise": 3, "hypothesis": HYPOTHESIS}, "application/json", 422,
                            "premise must be a string, not a number"),
    "an array for the body": ("/api/predict", [PREMISE, HYPOTHESIS], "application/json", 422,
                              "must be a JSON object, not an array"),
    "pairs not an array": ("/api/predict", {"pairs": "a b"}, "application/json", 422, "pairs must be an array"),
    "a pair of three": ("/api/predict", {"pairs": [[PREMISE, HYPOTHESIS, "x"]]}, "application/json", 422,
                        "pairs[0] must be a [premise, hypothesis] array"),
    "tokenized not a boolean": ("/api/predict", {"premise": PREMISE, "hypothesis": HYPOTHESIS, "tokenized": "yes"},
                                "application/json", 422, "tokenized must be true or false"),
    "an empty text": ("/api/attention", {"premise": " ", "hypothesis": HYPOTHESIS}, "application/json", 422,
                      "premise is empty"),
    "a text over the limit": ("/api/predict", {"premise": "a " * 1001, "hypothesis": HYPOTHESIS},
                              "application/json", 413, "2002 characters, over the limit of 2000"),
    "too many pairs": ("/api/predict", {"pairs": [[PREMISE, HYPOTHESIS]] * 257}, "application/json", 413,
                       "257 pairs, over the limit of 256"),
    "both kinds of request": ("/api/predict", {"pairs": [[PREMISE, HYPOTHESIS]], "premise": PREMISE},
                              "application/json", 422, "not both"),
    "an unknown path": ("/api/predikt", b"{}", "application/json", 404, "Nothing is served at /api/predikt"),
    "a GET of a POST endpoint": ("/api/predict", None, None, 405, "does not take GET"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_a_4xx_and_one_sentence_and_the_server_goes_on(server, case):
    path, body, content_type, expected_status, words = BAD_REQUESTS[case]
    status, answer = call(server, path, body, content_type)
    assert status == expected_status and isinstance(answer, dict) and list(answer) == ["error"], (status, answer)
    sentence = answer["error"]
    assert words in sentence
    assert "\n" not in sentence and sentence.endswith(".") and "Traceback" not in sentence
    assert call(server, "/api/health")[0] == 200
    status, answer = call(server, "/api/predict", {"premise": PREMISE, "hypothesis": HYPOTHESIS})
    assert status == 200 and answer["label"] in answer["probabilities"]


def page_data(page):
    """The data an attention page draws (its inlined JSON)."""
    return json.loads(re.search(r'<script id="attention-data" type="application/json">(.*?)</script>', page,
                                re.S).group(1).replace("<\\/", "</"))


def test_attention_answers_the_weights_and_the_page_nli_predict_draws(server, fine_tuned_run, tmp_path):
    status, view = call(server, "/api/attention", {"premise": PREMISE, "hypothesis": HYPOTHESIS})
    assert status == 200
    weights = onp.array(view["weights"])
    length = len(view["tokens"])
    assert weights.shape == (1, 2, length, length)  # the tiny BERT: 1 layer, 2 heads
    assert onp.abs(weights.sum(axis=-1) - 1).max() < 1e-3  # each row, to 4 decimals
    assert view["tokens"][view["boundary"]:] == "a person is awake . <sep>".split()
    _, predicted = call(server, "/api/predict", {"premise": PREMISE, "hypothesis": HYPOTHESIS})
    assert view["label"] == predicted["label"]
    assert_same_predictions([view], [predicted])

    status, page = call(server, "/attention?" + urllib.parse.urlencode({"premise": PREMISE,
                                                                        "hypothesis": HYPOTHESIS}))
    assert status == 200 and page.startswith("<!DOCTYPE html>")
    result = run_cli("predict", "--run", fine_tuned_run, "--devices", "cpu", PREMISE, HYPOTHESIS,
                     "--attention", tmp_path / "view.html")
    assert result.returncode == 0, result.stderr
    served, written = page_data(page), page_data((tmp_path / "view.html").read_text())
    assert served["tokens"] == written["tokens"] == view["tokens"] and served["label"] == written["label"]
    assert onp.abs(onp.array(served["weights"]) - onp.array(written["weights"])).max() <= 1e-4
    status, answer = call(server, "/attention?premise=x")
    assert status == 422 and answer == {"error": "hypothesis is missing from the request."}


def test_health_describes_the_model_and_the_page_needs_no_network(server):
    status, health = call(server, "/api/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "MXNet" and health["attention"]
    assert health["labels"] == ["entailment", "contradiction", "neutral"]
    assert health["limits"] == {"text_chars": 2000, "pairs": 256, "body_bytes": serve.MAX_BODY_BYTES}
    status, page = call(server, "/")
    assert status == 200 and "<textarea id=\"premise\"" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from elsewhere: works offline


def test_an_exported_run_is_served_and_refuses_attention_in_one_sentence(fine_tuned_run, real_pairs, tmp_path):
    pytest.importorskip("onnx", reason="`nli export` needs onnx, which needs numpy>=2.1 on Python 3.13")
    export_dir = str(tmp_path / "onnx")
    result = run_cli("export", "--run", fine_tuned_run, "--out", export_dir)
    assert result.returncode == 0, result.stderr
    pairs, path = real_pairs
    expected = predict_file(export_dir, path)
    with serving(export_dir, tmp_path) as (process, url, out, err):
        status, health = call(url, "/api/health")
        assert status == 200 and health["model"] == "ONNX Runtime fp32" and not health["attention"]
        status, answer = call(url, "/api/predict", {"pairs": [list(pair) for pair in pairs]})
        assert status == 200
        assert_same_predictions(answer["predictions"], expected)
        for path in ("/api/attention", "/attention?" + urllib.parse.urlencode({"premise": PREMISE,
                                                                                "hypothesis": HYPOTHESIS})):
            status, answer = call(url, path, {"premise": PREMISE, "hypothesis": HYPOTHESIS}
                                  if path.startswith("/api") else None)
            assert status == 409 and "is an ONNX export" in answer["error"]
            assert os.path.abspath(fine_tuned_run) in answer["error"]  # the run that has the weights
        assert call(url, "/api/health")[0] == 200
        status, stdout, stderr = stop(process, out, err)
    assert status == 0 and stdout.endswith("stopped\n") and "Traceback" not in stderr, stderr


def test_ctrl_c_stops_the_server_cleanly(fine_tuned_run, tmp_path):
    with serving(fine_tuned_run, tmp_path) as (process, url, out, err):
        assert call(url, "/api/health")[0] == 200
        started = time.monotonic()
        status, stdout, stderr = stop(process, out, err)
    assert status == 0 and time.monotonic() - started < 15
    assert stdout.startswith(f"serving {fine_tuned_run} (MXNet) at {url} (Ctrl-C stops)\n")
    assert stdout.endswith("stopped\n") and "Traceback" not in stderr, stderr


def test_a_port_in_use_or_a_missing_run_is_one_sentence_and_other_hosts_are_warned(fine_tuned_run, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--run", fine_tuned_run, "--port", port)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"error: Cannot listen on 127.0.0.1 port {port}: Address already in use; choose " \
                            f"another with --host/--port.\n"
    # 0.0.0.0 is bound but never listened on: the missing run stops the command first
    result = run_cli("serve", "--run", tmp_path / "no-run", "--host", "0.0.0.0", "--port", 0)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "warning: --host 0.0.0.0 lets other machines reach this server, and its API has no authentication: anyone "
        "who reaches the port can use the model.",
        f"error: {tmp_path / 'no-run'} is not a finished run: config.json is missing."]
    assert [serve.is_loopback(host) for host in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "192.168.1.2")] == \
        [True, True, True, False, False]


def test_the_page_predicts_a_typed_pair_and_draws_its_attention_in_a_real_browser(server, tmp_path):
    if reason := browser.missing():
        pytest.skip(reason)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver = browser.start_chromium(tmp_path / "profile")
    wait = WebDriverWait(driver, 60)
    try:
        driver.get(server)
        wait.until(lambda d: d.find_element(By.ID, "submit").is_enabled())  # the server's health has answered
        driver.find_element(By.ID, "premise").send_keys(PREMISE)
        driver.find_element(By.ID, "hypothesis").send_keys(HYPOTHESIS)
        driver.find_element(By.ID, "submit").click()
        label = wait.until(lambda d: d.find_element(By.ID, "label").get_attribute("data-label"))
        _, expected = call(server, "/api/predict", {"premise": PREMISE, "hypothesis": HYPOTHESIS})
        assert label == expected["label"] == driver.find_element(By.ID, "label").text
        rows = driver.find_elements(By.CSS_SELECTOR, "#probabilities .prob")
        assert [row.get_attribute("data-label") for row in rows] == list(expected["probabilities"])
        for row in rows:
            shown = float(row.text.split()[-1])
            assert shown == pytest.approx(expected["probabilities"][row.get_attribute("data-label")], abs=5e-4)
        assert "top" in driver.find_element(By.CSS_SELECTOR, f'.prob[data-label="{label}"]').get_attribute("class")

        driver.switch_to.frame(wait.until(lambda d: d.find_element(By.ID, "attention")))
        view = wait.until(lambda d: d.find_element(By.ID, "map").get_attribute("data-view"))
        assert view == "layer 1, head 1"
        cells = driver.execute_script(  # the map's pixels: drawn in shades of red, not blank
            "const c = document.getElementById('map'), d = c.getContext('2d').getImageData(0, 0, c.width, "
            "c.height).data; let red = 0; for (let i = 0; i < d.length; i += 4) if (d[i] - d[i + 1] > 80) red++; "
            "return red;")
        assert cells > 100
        assert "person" in driver.find_element(By.ID, "tokens").text
        driver.switch_to.default_content()

        history = [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#history li")]
        assert len(history) == 1 and history[0].startswith(label) and history[0].endswith(f"{PREMISE} / {HYPOTHESIS}")
        driver.find_element(By.CSS_SELECTOR, "#examples button").click()  # an SNLI example
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history li")) == 2)
        assert driver.find_element(By.ID, "premise").get_attribute("value").startswith("Two women are embracing")
        errors = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    finally:
        driver.quit()
    assert not errors, errors
