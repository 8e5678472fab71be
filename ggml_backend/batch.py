"""Offline generation over a file of requests (``ggml-backend batch IN OUT``): the part that does not need Ray.

One process and Ray Data's actors (``ggml_backend.batch_ray``) run the same functions, so a line gives the same
record wherever it runs:

* ``read_jobs`` reads the input (JSONL, or Parquet: one row per request) and checks each line's shape: an ``id``
  (a string or an integer, unique in the file), a ``prompt`` (text or token ids) or ``messages`` (a chat), and
  optional fields named as in OpenAI's completion and chat bodies (``max_tokens``, ``temperature``, ``stop``,
  ``response_format``...). A line that is not valid JSON, has no id, repeats an id or names an unknown field
  becomes an error record; the other lines still run.
* ``generate_record`` runs one request on a ``Llama``, with the HTTP server's own field checks
  (``server.common.Body``, ``sampling_kwargs``), so a value the server answers with a 400 is the same error here.
  The context is reset before each request: a line's result never depends on which lines ran before it on the same
  worker (no prompt prefix is reused), so at temperature 0 any number of workers give the one-process output.
* ``Journal`` appends one JSON record per line to OUT with a single ``write`` and fsyncs every few records, so an
  interrupted job loses at most the records not yet written; ``done_keys`` reads OUT back (a last line cut by the
  interruption is dropped) and a rerun skips what it holds.

Records: ``{"id", "line", "text", "finish_reason", "usage"}`` (and ``tool_calls`` when a chat reply calls tools);
for a line that failed ``{"id", "line", "error"}``, the id null when the line has no usable id or repeats an
earlier line's. A rerun skips the ids that have a record, and the id-less lines whose line number has one: failed
lines are not retried by themselves; to retry them, delete their error records from OUT.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

#: the longest input line (a request with a long chat history is well under 1 MiB)
MAX_LINE_BYTES = 16 * 1024 * 1024
#: fields a line may carry besides its id and prompt/messages (the names of OpenAI's completion and chat bodies)
SAMPLING_FIELDS = frozenset({
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "typical", "tfs_z", "repeat_penalty",
    "repeat_last_n", "presence_penalty", "frequency_penalty", "mirostat_mode", "mirostat", "mirostat_tau",
    "mirostat_eta", "penalize_nl", "seed", "logit_bias", "stop", "response_format", "grammar"})
COMPLETION_FIELDS = SAMPLING_FIELDS | {"id", "prompt"}
CHAT_FIELDS = SAMPLING_FIELDS | {"id", "messages", "max_completion_tokens", "tools", "tool_choice"}
#: records between two fsyncs of OUT (and at most this many seconds between them)
FSYNC_EVERY, FSYNC_S = 16, 2.0


@dataclass
class Job:
    """One input line: its number (from 1), its id (None when it has none) and its request, or why it is bad."""
    line: int
    id: object
    request: dict | None = None
    error: str | None = None

    @property
    def key(self):
        return key_of({"id": self.id, "line": self.line})


def key_of(record: dict):
    """What a rerun matches a record by: its id; its line when it has none (a line without a usable id, or one
    repeating an earlier line's id, gets an error record with a null id)."""
    return ("line", int(record["line"])) if record["id"] is None else ("id", json.dumps(record["id"]))


def error_record(job: Job, message: str) -> dict:
    from .server.errors import short
    return {"id": job.id, "line": job.line, "error": short(" ".join(message.split()))}


# ----------------------------------------------------------------------------------------------------- reading

def read_jobs(path: str) -> list[Job]:
    """Every line of the input as a Job (bad lines with their error). Parquet when the name ends in .parquet."""
    if path.lower().endswith(".parquet"):
        rows = _parquet_rows(path)
    else:
        rows = _jsonl_rows(path)
    jobs, first_line_of = [], {}
    for line, row in rows:
        job = _check_row(line, row)
        if job.error is None:
            seen = first_line_of.setdefault(json.dumps(job.id), line)
            if seen != line:
                job = Job(line, None, error=f"line {line}: duplicate id {json.dumps(job.id)[:80]} "
                                              f"(first on line {seen}); this line is not run")
        jobs.append(job)
    return jobs


def _jsonl_rows(path: str):
    """(line number, parsed object or the error text) of every non-blank line, each at most MAX_LINE_BYTES."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        line = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            line += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):   # skip the rest of the overlong line
                    raw = f.readline(MAX_LINE_BYTES)
                yield line, ReadError(f"line {line}: longer than {MAX_LINE_BYTES:,} bytes")
                continue
            if not raw.strip():
                continue
            try:
                yield line, json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                yield line, ReadError(f"line {line}: not valid JSON: {exc}")
            except RecursionError:
                yield line, ReadError(f"line {line}: JSON nested too deeply")


class ReadError(str):
    """Why a line could not be read (a JSON string is a line's value, not an error)."""


def _parquet_rows(path: str):
    """(row number from 1, the row as a dict without its null fields): a column only some rows use is null in
    the others."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading Parquet needs pyarrow (pip install 'ggml-backend[ray]' brings it)") from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:   # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"cannot read {path} as Parquet: {exc}") from None
    for index, row in enumerate(table.to_pylist(), start=1):
        yield index, {k: v for k, v in row.items() if v is not None}


def _check_row(line: int, row) -> Job:
    if isinstance(row, ReadError):
        return Job(line, None, error=str(row))
    if not isinstance(row, dict):
        return Job(line, None, error=f"line {line}: expected a JSON object, got {type(row).__name__}")
    job_id = row.get("id")
    if job_id is None:
        return Job(line, None, error=f"line {line}: no 'id'")
    if isinstance(job_id, bool) or not isinstance(job_id, (str, int)):
        return Job(line, None, error=f"line {line}: 'id' must be a string or an integer, "
                                     f"got {type(job_id).__name__}")
    has_prompt, has_messages = "prompt" in row, "messages" in row
    if has_prompt == has_messages:
        return Job(line, job_id, error=f"line {line}: give either 'prompt' or 'messages'"
                                       + (", not both" if has_prompt else ""))
    known = COMPLETION_FIELDS if has_prompt else CHAT_FIELDS
    unknown = sorted(map(str, set(row) - known))
    if unknown:
        return Job(line, job_id, error=f"line {line}: unknown fields {', '.join(unknown)[:200]} (known for a "
                                       f"{'prompt' if has_prompt else 'chat'}: {', '.join(sorted(known))})")
    return Job(line, job_id, request=row)


# ---------------------------------------------------------------------------------------------- generating

def load_llama(model_path: str | None, n_ctx: int, n_threads: int | None, chat_template: str | None = None):
    """The model a worker holds (the file memory-mapped); no path: the default model."""
    from .api import Llama
    return Llama(model_path, n_ctx=n_ctx, n_threads=n_threads, chat_format=chat_template, verbose=False)


def generate_record(llm, job: Job) -> dict:
    """The record of one job: its result, or an error record saying what was wrong with its request."""
    if job.error is not None:
        return error_record(job, job.error)
    from .server.errors import APIError
    try:
        return _generate(llm, job)
    except APIError as exc:
        return error_record(job, f"line {job.line}: {exc.message}")
    except (ValueError, TypeError) as exc:   # the Llama's own checks (a template that cannot render...)
        return error_record(job, f"line {job.line}: {exc}")


def _generate(llm, job: Job) -> dict:
    from .server.common import Body, check_max_tokens, checked_token_ids, sampling_kwargs
    from .server.errors import APIError
    from .server.openai import _grammar
    body = Body(job.request)
    kwargs = dict(sampling_kwargs(body, llm.n_vocab()), stop=body.stops("stop"), grammar=_grammar(body))
    llm.reset()   # no prefix of an earlier line is reused: a record never depends on what ran before it
    if "prompt" in job.request:
        prompt = job.request["prompt"]
        if isinstance(prompt, list):
            tokens = checked_token_ids(prompt, llm.n_vocab(), "prompt")
        elif isinstance(prompt, str):
            tokens = llm.tokenize(prompt, add_bos=llm.tokenizer.add_bos, special=True)
        else:
            raise APIError(400, f"'prompt' must be a string or a list of token ids, got {type(prompt).__name__}")
        if not tokens:
            raise APIError(400, "the prompt is empty")
        max_tokens = check_max_tokens(body.int("max_tokens", default=16, low=1), len(tokens), llm.n_ctx())
        out = llm.create_completion(tokens, max_tokens=max_tokens, **kwargs)
        choice = out["choices"][0]
        record = {"id": job.id, "line": job.line, "text": choice["text"], "finish_reason": choice["finish_reason"],
                  "usage": out["usage"]}
        return record
    messages = job.request["messages"]
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list")
    tools = job.request.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise APIError(400, "'tools' must be a list of tool objects")
    tool_choice = job.request.get("tool_choice")
    if tool_choice == "none" or not tools:
        tools, tool_choice = None, None
    tokens, _, _ = llm.render_chat_prompt(messages, tools=tools)
    max_tokens = check_max_tokens(body.int("max_completion_tokens", "max_tokens", default=None, low=1),
                                  len(tokens), llm.n_ctx())
    out = llm.create_chat_completion(messages, tools=tools, tool_choice=tool_choice, max_tokens=max_tokens,
                                     **kwargs)
    choice = out["choices"][0]
    record = {"id": job.id, "line": job.line, "text": choice["message"].get("content") or "",
              "finish_reason": choice["finish_reason"], "usage": out["usage"]}
    if choice["message"].get("tool_calls"):
        record["tool_calls"] = choice["message"]["tool_calls"]
    return record


# ------------------------------------------------------------------------------------------------- writing

def is_parquet(path: str) -> bool:
    return path.lower().endswith(".parquet")


def journal_path(out_path: str) -> str:
    """Where records are appended as they come: OUT itself, or for a Parquet OUT (which cannot be appended to)
    a JSONL file beside it, folded into OUT when every line is done."""
    return out_path + ".partial.jsonl" if is_parquet(out_path) else out_path


def done_keys(out_path: str) -> set:
    """The keys (``key_of``) of the records already written (OUT, and for Parquet its journal too)."""
    keys = set()
    if is_parquet(out_path) and os.path.exists(out_path):
        keys.update(key_of(r) for r in read_parquet_records(out_path))
    keys.update(key_of(r) for r in read_journal(journal_path(out_path)))
    return keys


def read_journal(path: str) -> list[dict]:
    """The records of a JSONL OUT. A last line without its newline is what an interrupted write left: it is cut
    off here, so the rerun writes that record again, whole."""
    if not os.path.exists(path):
        return []
    with open(path, "r+b") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
            os.fsync(f.fileno())
    records = []
    for number, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            key_of(record)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: line {number} is not a record of ggml-backend batch; not appending to "
                             "this file (give another output file)") from None
        records.append(record)
    return records


#: the columns of a Parquet OUT (tool_calls as JSON text: its shape varies from call to call)
PARQUET_COLUMNS = ("id", "line", "text", "finish_reason", "usage", "tool_calls", "error")


def read_parquet_records(path: str) -> list[dict]:
    import pyarrow.parquet as pq
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path} as Parquet: {exc}") from None
    records = []
    for number, row in enumerate(rows, start=1):
        if "line" not in row or "id" not in row:
            raise ValueError(f"{path}: row {number} is not a record of ggml-backend batch; not overwriting this "
                             "file (give another output file)")
        record = {k: v for k, v in row.items() if v is not None or k == "id"}
        if record.get("tool_calls") is not None:
            record["tool_calls"] = json.loads(record["tool_calls"])
        records.append(record)
    return records


def finish_parquet(out_path: str) -> None:
    """Fold the journal into the Parquet OUT (written under a temporary name, then renamed over it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    records = (read_parquet_records(out_path) if os.path.exists(out_path) else []) + \
        read_journal(journal_path(out_path))
    ids = [r["id"] for r in records]
    if len({type(i) for i in ids if i is not None}) > 1:   # Arrow columns hold one type: mixed ids as text
        ids = [None if i is None else str(i) for i in ids]
    columns = {"id": ids}
    for name in PARQUET_COLUMNS[1:]:
        values = [r.get(name) for r in records]
        if name == "tool_calls":
            values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
        columns[name] = values
    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    tmp = out_path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out_path)
    if os.path.exists(journal_path(out_path)):
        os.remove(journal_path(out_path))


class Journal:
    """OUT opened for appending: one record per line, each written whole by one ``write`` call."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.unsynced = 0
        self.last_sync = time.monotonic()

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        view = memoryview(data)
        while view:   # a regular file takes it in one call; loop only in case it does not
            view = view[os.write(self.fd, view):]
        self.unsynced += 1
        if self.unsynced >= FSYNC_EVERY or time.monotonic() - self.last_sync > FSYNC_S:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.fd)
        self.unsynced, self.last_sync = 0, time.monotonic()

    def close(self) -> None:
        if self.fd is not None:
            self.sync()
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Progress:
    """A progress bar over the lines to run, with generated tokens per second (stderr)."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit="line", disable=not enabled, dynamic_ncols=True)
        self.started = time.monotonic()
        self.tokens = 0
        self.errors = 0

    def update(self, record: dict) -> None:
        if "error" in record:
            self.errors += 1
        else:
            self.tokens += record["usage"]["completion_tokens"]
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:.1f} tok/s, {self.errors} errors", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------------- running

@dataclass
class BatchSummary:
    total: int          # lines in the input
    skipped: int        # already in OUT
    written: int        # records written by this run
    errors: int         # of which error records
    tokens: int         # completion tokens generated
    seconds: float


def pending_jobs(in_path: str, out_path: str) -> tuple[list[Job], int, int]:
    """(the jobs OUT does not hold yet, lines in the input, lines skipped)."""
    if os.path.abspath(in_path) in (os.path.abspath(out_path), os.path.abspath(journal_path(out_path))):
        raise ValueError(f"the output file must not be the input file ({in_path})")
    jobs = read_jobs(in_path)
    done = done_keys(out_path)
    todo = [j for j in jobs if j.key not in done]
    return todo, len(jobs), len(jobs) - len(todo)


def run_local(in_path: str, out_path: str, *, model_path: str | None = None, n_ctx: int = 4096,
              n_threads: int | None = None, chat_template: str | None = None, progress: bool = True,
              llm=None) -> BatchSummary:
    """The whole job in this process (``llm``: a loaded model to use instead of loading ``model_path``)."""
    started = time.monotonic()
    todo, total, skipped = pending_jobs(in_path, out_path)
    if llm is None and any(j.error is None for j in todo):
        llm = load_llama(model_path, n_ctx, n_threads, chat_template)
    records = (generate_record(llm, job) for job in todo)
    return write_records(records, len(todo), out_path, total, skipped, started, progress)


def write_records(records, n_todo: int, out_path: str, total: int, skipped: int, started: float,
                  progress: bool) -> BatchSummary:
    """Append records to OUT as they come (from this process or from Ray's actors); the summary at the end. A
    Parquet OUT is written once every line has its record."""
    bar = Progress(n_todo, progress)
    written = 0
    try:
        with Journal(journal_path(out_path)) as journal:
            for record in records:
                journal.write(record)
                bar.update(record)
                written += 1
    finally:
        bar.close()
    if is_parquet(out_path):
        finish_parquet(out_path)
    return BatchSummary(total, skipped, written, bar.errors, bar.tokens, time.monotonic() - started)
