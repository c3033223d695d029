"""The hub-reachability check (issue #14, item 4) asks ``HF_ENDPOINT`` — not a hard-coded huggingface.co — and
goes through the environment's proxies, bypassing them for NO_PROXY hosts. A local ``http.server`` on 127.0.0.1
plays the endpoint (and the proxy); an unused port plays a hub that does not answer."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from esa.models import hub_reachable

PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "no_proxy",
              "all_proxy")


class _Answer(http.server.BaseHTTPRequestHandler):
    """Answers every request 200 and records its request line (a proxied request carries the full URL)."""

    seen: list[str] = []

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        _Answer.seen.append(self.requestline)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server():
    """http://127.0.0.1:PORT answering 200, for the duration of the test."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    _Answer.seen.clear()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def env(monkeypatch):
    """No proxies and not offline, whatever the machine's environment says."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return monkeypatch


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_reachable_endpoint(env, server):
    env.setenv("HF_ENDPOINT", server)
    assert hub_reachable(timeout=2)
    assert _Answer.seen == ["HEAD / HTTP/1.1"]


def test_an_endpoint_on_an_unused_port_is_unreachable(env):
    env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_unused_port()}")
    assert not hub_reachable(timeout=0.5)


def test_offline_is_unreachable_without_asking(env, server):
    env.setenv("HF_ENDPOINT", server)
    env.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable(timeout=2) and _Answer.seen == []


def test_the_request_goes_through_the_proxy(env, server):
    """The endpoint's host does not resolve; the proxy (our server) is asked for its full URL and answers."""
    env.setenv("HF_ENDPOINT", "http://hub.invalid")
    env.setenv("HTTP_PROXY", server)
    assert hub_reachable(timeout=2)
    assert _Answer.seen == ["HEAD http://hub.invalid/ HTTP/1.1"]


def test_a_dead_proxy_makes_the_hub_unreachable_unless_no_proxy_names_it(env, server):
    env.setenv("HF_ENDPOINT", server)
    env.setenv("HTTP_PROXY", f"http://127.0.0.1:{_unused_port()}")
    assert not hub_reachable(timeout=0.5)
    env.setenv("NO_PROXY", "127.0.0.1")
    assert hub_reachable(timeout=2)


def test_a_malformed_endpoint_is_unreachable(env):
    env.setenv("HF_ENDPOINT", "not a url")
    assert not hub_reachable(timeout=0.5)
