"""A local OpenAI-compatible chat-completions server (127.0.0.1) in front of the transformers engine.

It serves the tiny test models exactly as `vllm serve` would serve a real one (structured outputs
included: a ``response_format`` JSON schema is decoded under), and can be told to fail its first N
requests with 500 to exercise the client's retries.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loopback import BackgroundServer

from facecap.stages.shared.engines import Request, Sampling, TransformersEngine


class OpenAIServer(BackgroundServer):
    def __init__(self, model: str, vision: bool, fail_first: int = 0, garble_first: int = 0):
        self.engine = TransformersEngine(model, vision=vision, device="cpu")
        self.fail_first = fail_first
        self.garble_first = garble_first  # answer this many requests with text that is not JSON
        self.requests = 0
        self.schemas = 0  # requests that asked for JSON under a schema
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                with server._lock:
                    server.requests += 1
                    failing = server.requests <= server.fail_first
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    answer = None if failing else server.answer(body)
                if failing:
                    self.send_response(500)
                    self.end_headers()
                    return
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, body: dict) -> dict:
        image, messages = None, []
        for message in body["messages"]:
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part["type"] == "image_url":
                        image = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                        parts.append({"type": "image"})
                    else:
                        parts.append(part)
                content = parts
            messages.append({"role": message["role"], "content": content})
        sampling = Sampling(body.get("max_tokens", 32), body.get("temperature", 0.7), body.get("top_p", 0.9))
        # response_format json_schema, as vLLM's server honours it: decoding under the schema.
        schema = (body.get("response_format") or {}).get("json_schema", {}).get("schema")
        self.schemas += schema is not None
        request = Request(messages, image, body.get("seed", 0), json_schema=schema)
        [generation] = self.engine.generate([request], sampling)
        if self.garble_first > 0:
            self.garble_first -= 1
            generation.text = "Sure! The person looks friendly."
        return {
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text}}],
            "usage": {"completion_tokens": generation.tokens},
        }
