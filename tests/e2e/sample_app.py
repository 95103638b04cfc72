"""A small Functions app that exercises every trigger and binding the local host supports.

It is the host's own test subject (the project's function_app has its own e2e tests).  Queue
messages are JSON ``{"id", "action"}``: ``ok`` writes ``%RESULTS_CONTAINER%/{id}.json`` (blob
output whose path uses the message's own ``id``), ``fail`` raises, ``dead`` writes to the
``%SYNC_QUEUE_NAME%-deadletter`` queue, ``slow`` takes a moment so concurrency can be observed.
"""

from __future__ import annotations

import json
import threading
import time

import azure.functions as func
from azure.functions.timer import TimerRequest

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

_lock = threading.Lock()
_running = 0
_max_running = 0


@app.route(route="enqueue/{source}", methods=["POST"])
@app.queue_output(arg_name="out", queue_name="%SYNC_QUEUE_NAME%", connection="AzureWebJobsStorage")
def enqueue(req: func.HttpRequest, out: func.Out[list[str]]) -> func.HttpResponse:
    jobs = req.get_json()
    if not isinstance(jobs, list):
        return func.HttpResponse('{"error": "a list"}', status_code=400, mimetype="application/json")
    out.set([json.dumps(job) for job in jobs])
    body = {"accepted": len(jobs), "source": req.route_params["source"]}
    return func.HttpResponse(json.dumps(body), status_code=202, mimetype="application/json")


@app.route(route="echo/{name?}", methods=["GET", "POST"], auth_level=func.AuthLevel.ANONYMOUS)
def echo(req: func.HttpRequest) -> func.HttpResponse:
    body = {
        "method": req.method,
        "url": req.url,
        "params": dict(req.params),
        "route": dict(req.route_params),
        "header": req.headers.get("x-test"),
        "body": req.get_body().decode("utf-8"),
    }
    return func.HttpResponse(json.dumps(body), headers={"X-Echo": "1"}, mimetype="application/json")


@app.route(route="stats", methods=["GET"], auth_level=func.AuthLevel.ADMIN)
def stats(req: func.HttpRequest) -> func.HttpResponse:
    with _lock:
        return func.HttpResponse(json.dumps({"maxRunning": _max_running}), mimetype="application/json")


@app.route(route="boom", auth_level=func.AuthLevel.ANONYMOUS)
@app.queue_output(arg_name="out", queue_name="%SYNC_QUEUE_NAME%", connection="AzureWebJobsStorage")
def boom(req: func.HttpRequest, out: func.Out[str]) -> func.HttpResponse:
    out.set('{"id": "never", "action": "ok"}')
    raise RuntimeError("boom")


@app.function_name("process")
@app.queue_trigger(arg_name="msg", queue_name="%SYNC_QUEUE_NAME%", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="dead", queue_name="%SYNC_QUEUE_NAME%-deadletter",
                  connection="AzureWebJobsStorage")
@app.blob_output(arg_name="result", path="%RESULTS_CONTAINER%/{id}.json", connection="AzureWebJobsStorage")
def process(msg: func.QueueMessage, dead: func.Out[str], result: func.Out[str]) -> None:
    global _running, _max_running
    job = json.loads(msg.get_body())
    action = job["action"]
    if action == "fail":
        raise RuntimeError(f"transient failure of {job['id']} (dequeue {msg.dequeue_count})")
    if action == "dead":
        dead.set(json.dumps({"job": job, "reason": "invalid_job"}))
        return
    if action == "slow":
        with _lock:
            _running += 1
            _max_running = max(_max_running, _running)
        time.sleep(0.3)  # the work itself: lets invocations overlap
        with _lock:
            _running -= 1
    result.set(json.dumps({"id": job["id"], "dequeueCount": msg.dequeue_count, "messageId": msg.id}))


@app.timer_trigger(arg_name="timer", schedule="%TICK_SCHEDULE%", run_on_startup=False, use_monitor=False)
@app.blob_input(arg_name="roster", path="%RESULTS_CONTAINER%/roster.csv", connection="AzureWebJobsStorage",
                data_type=func.DataType.STRING)
@app.blob_output(arg_name="report", path="%RESULTS_CONTAINER%/reports/{DateTime}.json",
                 connection="AzureWebJobsStorage")
def tick(timer: TimerRequest, roster: str | None, report: func.Out[str]) -> None:
    rows = [] if roster is None else roster.strip().splitlines()[1:]
    report.set(json.dumps({"pastDue": timer.past_due, "rows": rows, "rosterMissing": roster is None}))
