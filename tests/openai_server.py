"""A local OpenAI-compatible server for tests: real generation with a Hugging Face model, on a loopback port,
and faults injected on request (429, 500, a stalled connection, malformed JSON)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch


class OpenAIServer:
    """`faults`: a queue consumed one per request ("400", "429", "500", "stall", "malformed"); `always_fail`:
    prompts containing one of these strings always get a 500; `max_n` > 0: at most that many completions per
    request, whatever n asks (as some servers do). `requests` and `auth` record what arrived."""

    def __init__(self, model_dir: Path, stall_seconds: float = 5.0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
        self.faults: list[str] = []
        self.always_fail: set[str] = set()
        self.max_n = 0
        self.requests: list[dict] = []
        self.auth: set[str] = set()
        self.stall_seconds = stall_seconds
        self.lock, self.gen_lock = threading.Lock(), threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.auth.add(self.headers.get("Authorization", ""))
                    fault = server.faults.pop(0) if server.faults else None
                if fault in ("400", "429", "500") or any(s in body.get("prompt", "") for s in server.always_fail):
                    code = int(fault) if fault in ("400", "429") else 500
                    return self._send(code, json.dumps({"error": {"message": f"injected {code}", "type": "x"}}))
                if fault == "stall":
                    time.sleep(server.stall_seconds)  # longer than the client's timeout
                    return self._send(200, "{}")
                if fault == "malformed":
                    return self._send(200, '{"choices": [{"text": "cut off')
                self._send(200, json.dumps(server.complete(body)))

            def _send(self, code: int, text: str):
                data = text.encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a stalled request
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def complete(self, body: dict) -> dict:
        """/v1/completions: n sampled continuations of the prompt text (BOS added, as the model was trained)."""
        ids = [self.tok.bos_token_id, *self.tok(body["prompt"], add_special_tokens=False)["input_ids"]]
        n, new = int(body.get("n", 1)), int(body.get("max_tokens", 16))
        n = min(n, self.max_n) if self.max_n else n
        torch.manual_seed(int(body.get("seed") or 0))
        with torch.no_grad(), self.gen_lock:  # one generation at a time; requests still arrive
            temperature = float(body["temperature"])
            how = dict(do_sample=True, temperature=temperature, top_p=float(body.get("top_p", 1.0)), top_k=0) \
                if temperature > 0 else dict(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None)
            out = self.model.generate(torch.tensor([ids]), **how, max_new_tokens=new, num_return_sequences=n,
                                      pad_token_id=self.tok.pad_token_id)[:, len(ids):]
        choices = []
        for i, row in enumerate(out.tolist()):
            ended = self.tok.eos_token_id in row
            row = row[:row.index(self.tok.eos_token_id)] if ended else row
            choices.append({"index": i, "text": self.tok.decode(row, skip_special_tokens=True),
                            "finish_reason": "stop" if ended else "length", "logprobs": None})
        return {"id": "cmpl-test", "object": "text_completion", "created": int(time.time()), "model": body["model"],
                "choices": choices, "usage": {"prompt_tokens": len(ids), "completion_tokens": int(out.numel()),
                                              "total_tokens": len(ids) + int(out.numel())}}

    def __enter__(self) -> OpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
