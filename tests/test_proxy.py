"""The front door: Debian's nginx in front of a real gateway (tiny preset, uvicorn in a thread on
loopback), configured from the very template docker-compose.yml's proxy renders, with the
certificate its entrypoint script makes. Header-stalling connections are cut off at the header
timeout without keeping a normal client out; the gateway's 503 and Retry-After pass through;
per-client limits and oversized bodies are refused in the gateway's error shape. Then the gateway
alone: the connection limits uvicorn itself enforces, set from the settings."""

import os
import re
import select
import shutil
import socket
import ssl
import string
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgpack
import pytest
import yaml

from comneck.errors import ErrorCode
from comneck.image import sample_photo
from comneck_edge import EdgeEncoder
from comneck_edge.client import GatewayClient
from comneck_server.app import create_app
from comneck_server.demo import free_port, stop_process
from comneck_server.gateway import Gateway
from comneck_server.settings import ServerSettings
from in_thread import serving

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "docker/nginx/comneck.conf.template"
TLS_SCRIPT = ROOT / "docker/nginx/comneck-tls.sh"
LIMIT = 64 * 1024  # the gateway's max_body_bytes, and so the proxy's client_max_body_size
PROMPT = "Labels: cow, horse, beach"
STALLERS = 40


def directive(name: str) -> list[str]:
    """The arguments of the template's one ``name`` directive (the numbers the tests hold it to)."""
    (found,) = re.findall(rf"^\s*{name}\s+([^;]+);", TEMPLATE.read_text(), re.M)
    return found.split()


def seconds(value: str) -> float:
    assert value.endswith("s"), value
    return float(value[:-1])


HEADER_TIMEOUT_S = seconds(directive("client_header_timeout")[0])
RATE = float(re.fullmatch(r"rate=(\d+)r/s", directive("limit_req_zone")[2])[1])
BURST = int(re.fullmatch(r"burst=(\d+)", directive("limit_req")[1])[1])
CONNECTIONS = int(directive("limit_conn")[1])


def make_certificate(folder: Path) -> subprocess.CompletedProcess:
    """The proxy image's entrypoint script, run on ``folder`` as the image runs it."""
    return subprocess.run(["sh", str(TLS_SCRIPT)], env={"PATH": "/usr/bin:/bin:/usr/local/bin", "PROXY_TLS_DIR": str(folder)},
                          capture_output=True, text=True, timeout=60)


@dataclass
class Proxy:
    https: str
    http: str
    https_port: int
    certificate: Path
    gateway: Gateway

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certificate))

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.https, verify=self.tls(), timeout=20)


def render(values: dict[str, str]) -> str:
    """The template as the nginx image renders it: envsubst of the PROXY_* names only (its filter)."""
    text = string.Template(TEMPLATE.read_text()).safe_substitute(values)
    assert "${PROXY_" not in text
    return text


@pytest.fixture(scope="module")
def nginx() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")  # /usr/sbin: off a user's PATH
    if found is None:
        pytest.skip("no nginx on PATH or in /usr/sbin (apt-get install nginx-light)")
    return found


@pytest.fixture(scope="module")
def good(tiny) -> bytes:
    return EdgeEncoder(tiny).encode_file(sample_photo()).data


@pytest.fixture(scope="module")
def proxy(nginx, tiny_pipeline, tmp_path_factory) -> Iterator[Proxy]:
    settings = ServerSettings(port=free_port(), max_body_bytes=LIMIT, max_queue=1, log_level="warning")
    gateway = Gateway(tiny_pipeline, settings)
    folder = tmp_path_factory.mktemp("nginx")
    made = make_certificate(folder / "tls")
    assert made.returncode == 0, made.stderr
    https_port, http_port = free_port(), free_port()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["proxy"]["environment"]
    local = {"PROXY_UPSTREAM": f"127.0.0.1:{settings.port}", "PROXY_HTTPS_LISTEN": f"127.0.0.1:{https_port}",
             "PROXY_HTTP_LISTEN": f"127.0.0.1:{http_port}", "PROXY_TLS_DIR": str(folder / "tls"), "PROXY_MAX_BODY_BYTES": str(LIMIT)}
    assert set(local) <= set(compose)  # the names compose gives the image, here for loopback and this folder
    (folder / "comneck.conf").write_text(render({**compose, **local}))
    temp_paths = " ".join(f"{kind}_temp_path {folder / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user root;" if os.geteuid() == 0 else ""  # as root, nginx's workers would run as nobody, who cannot write here
    (folder / "nginx.conf").write_text(  # the image's nginx.conf, reduced: one worker, its files in this folder
        f"daemon off; worker_processes 1; pid {folder}/nginx.pid; error_log {folder}/error.log info; {user}\n"
        "events { worker_connections 1024; }\n"
        f"http {{ access_log {folder}/access.log; default_type application/octet-stream; {temp_paths}\n"
        f"       include {folder}/comneck.conf; }}\n"
    )
    with serving(create_app(settings, gateway), settings):
        output = (folder / "nginx.out").open("w")
        process = subprocess.Popen([nginx, "-p", str(folder), "-c", str(folder / "nginx.conf")], stdout=output, stderr=output)
        try:
            deadline = time.monotonic() + 10
            while True:
                assert process.poll() is None, (folder / "nginx.out").read_text()
                try:
                    socket.create_connection(("127.0.0.1", http_port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "nginx did not start"
                    time.sleep(0.05)
            yield Proxy(f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", https_port, folder / "tls/cert.pem", gateway)
        finally:
            stop_process(process)
            output.close()


def heard(sock: ssl.SSLSocket) -> bytes | None:
    """What nginx has sent on ``sock`` (b"": it closed it), or None while it has neither answered
    nor closed (TLS 1.3 session tickets make a socket readable with nothing for the application,
    so select alone cannot tell)."""
    sock.setblocking(False)
    try:
        return sock.recv(1024)
    except ssl.SSLWantReadError:
        return None
    except OSError:  # reset
        return b""


@pytest.fixture
def full_bucket(proxy) -> None:
    """Wait until this address's request budget at the proxy is whole again (earlier tests spent some)."""
    time.sleep((BURST + 1) / RATE)


def test_header_stallers_are_cut_off_and_keep_nobody_out(proxy, good, monkeypatch):
    tls = proxy.tls()
    start = time.monotonic()
    stallers = []
    for _ in range(STALLERS):  # each: TLS, then part of a request line and headers
        sock = tls.wrap_socket(socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5), server_hostname="127.0.0.1")
        sock.sendall(b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        stallers.append(sock)
    closed: dict[int, float] = {}  # staller -> seconds from the start to its end
    answers: set[bytes] = set()

    def trickle() -> None:
        """One byte more on each open staller; note when nginx has ended one, and what it said."""
        for i, sock in enumerate(stallers):
            if i in closed:
                continue
            try:
                if (said := heard(sock)) is not None:
                    answers.add(said)
                    raise ConnectionError
                sock.send(b"a")
            except OSError:
                closed[i] = time.monotonic() - start

    for _ in range(2):
        time.sleep(1)
        trickle()
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.certificate))  # how comneck-edge trusts the self-signed certificate
    with GatewayClient(proxy.https, retries=0, timeout=10) as client:
        answer = client.infer(good, PROMPT)
    assert answer["text"] in ("cow", "horse", "beach") and answer["random_weights"] is True
    assert not closed and time.monotonic() - start < HEADER_TIMEOUT_S - 2, "served only once the stallers were gone"
    for _ in range(int(HEADER_TIMEOUT_S) + 4):  # bounded: a byte a second until all are cut off
        time.sleep(1)
        trickle()
        if len(closed) == STALLERS:
            break
    for sock in stallers:
        sock.close()
    assert len(closed) == STALLERS, f"{STALLERS - len(closed)} stallers still open after {time.monotonic() - start:.0f} s"
    assert HEADER_TIMEOUT_S - 0.5 < min(closed.values()) and max(closed.values()) < HEADER_TIMEOUT_S + 2.5, sorted(closed.values())
    assert answers <= {b""}  # closed without an answer


def test_the_gateways_busy_and_retry_after_pass_through(proxy, good):
    body = {"content": msgpack.packb({"bitstream": good, "prompt": PROMPT}), "headers": {"Content-Type": "application/msgpack"}}
    hold = threading.Event()
    proxy.gateway.batcher.call(lambda: hold.wait(20))  # the model thread is busy: the next request waits in the queue (max_queue 1)
    with proxy.client() as http:
        results: list[httpx.Response] = []
        first = threading.Thread(target=lambda: results.append(http.post("/infer", **body)))
        first.start()
        try:
            deadline = time.monotonic() + 10
            while "comneck_admitted_requests 1.0" not in http.get("/metrics").text:  # until the first holds the one slot
                assert time.monotonic() < deadline, "the first request was not admitted"
                time.sleep(0.1)
            busy = http.post("/infer", **body)
        finally:
            hold.set()
            first.join(20)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
    assert busy.json()["error"]["code"] == ErrorCode.BUSY and busy.headers["content-type"] == "application/json"
    assert [r.status_code for r in results] == [200]


def test_a_body_over_the_limit_is_refused_by_the_proxy(proxy):
    with proxy.client() as http:
        over = http.post("/infer", content=b"x" * (LIMIT + 1), headers={"Content-Type": "application/msgpack"})
        at = http.post("/infer", content=b"x" * LIMIT, headers={"Content-Type": "application/msgpack"})
    assert over.status_code == ErrorCode.BODY_TOO_LARGE.status and over.headers["content-type"] == "application/json"
    assert over.json()["error"] == {"code": "body_too_large", "message": f"request body is over the limit of {LIMIT} bytes"}
    assert at.status_code == 400 and at.json()["error"]["code"] == "bad_request"  # the gateway read it: not msgpack


def test_plain_http_reaches_the_same_gateway(proxy):
    readyz = httpx.get(f"{proxy.http}/readyz", timeout=10)
    assert readyz.status_code == 200 and readyz.json()["status"] == "ready"


def test_requests_past_the_rate_get_429_with_retry_after(proxy, full_bucket):
    statuses, refusal = [], None
    with proxy.client() as http:
        for _ in range(BURST + 10):  # back to back on one connection: only the rate limit applies
            response = http.get("/healthz")
            statuses.append(response.status_code)
            refusal = response if response.status_code == 429 else refusal
    assert set(statuses) == {200, 429} and BURST + 1 <= statuses.count(200) <= BURST + 4, statuses
    assert statuses.index(429) >= BURST + 1
    assert refusal.headers["retry-after"] == "1" and refusal.headers["content-type"] == "application/json"
    assert refusal.json()["error"]["code"] == ErrorCode.RATE_LIMITED and ErrorCode.RATE_LIMITED.status == 429


def test_connections_past_the_per_client_limit_get_429(proxy, full_bucket):
    tls = proxy.tls()
    uploads = []
    try:
        for _ in range(CONNECTIONS):  # headers in, body pending: each holds a connection slot
            sock = tls.wrap_socket(socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5), server_hostname="127.0.0.1")
            sock.sendall(b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/msgpack\r\nContent-Length: 1000\r\n\r\n")
            uploads.append(sock)
        time.sleep(0.3)
        with proxy.client() as http:
            refused = http.get("/healthz")
        assert [heard(sock) for sock in uploads] == [None] * CONNECTIONS, "an upload was answered before its body came"
    finally:
        for sock in uploads:
            sock.close()
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
    assert refused.json()["error"]["code"] == ErrorCode.RATE_LIMITED
    deadline = time.monotonic() + 5
    with proxy.client() as http:
        while (ok := http.get("/healthz")).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.1)  # nginx notices the closed uploads
    assert ok.status_code == 200


def test_the_entrypoint_makes_a_certificate_once_and_keeps_a_mounted_one(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl on PATH")
    made = make_certificate(tmp_path / "tls")
    assert made.returncode == 0 and "made a self-signed certificate" in made.stdout, made.stderr
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "tls/cert.pem"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    assert (tmp_path / "tls/key.pem").stat().st_mode & 0o077 == 0  # the key is the owner's alone
    before = (tmp_path / "tls/cert.pem").read_bytes()
    kept = make_certificate(tmp_path / "tls")  # a restart, or a mounted pair: used as it is
    assert kept.returncode == 0 and "using" in kept.stdout and (tmp_path / "tls/cert.pem").read_bytes() == before
    (tmp_path / "half").mkdir()
    (tmp_path / "half/cert.pem").write_bytes(before)
    half = make_certificate(tmp_path / "half")
    assert half.returncode == 1 and "only one of cert.pem and key.pem" in half.stderr and not (tmp_path / "half/key.pem").exists()


# -- the gateway alone: what uvicorn enforces -----------------------------------------------------------

KEEP_ALIVE_S, MAX_CONNECTIONS, MAX_HEADER_BYTES = 1, 4, 2048


@pytest.fixture(scope="module")
def bare(tiny_pipeline) -> Iterator[int]:
    settings = ServerSettings(port=free_port(), keep_alive_timeout_s=KEEP_ALIVE_S, max_connections=MAX_CONNECTIONS,
                              max_header_bytes=MAX_HEADER_BYTES, log_level="warning")
    with serving(create_app(settings, Gateway(tiny_pipeline, settings)), settings) as port:
        yield port


def status_of(sock: socket.socket) -> int:
    """The status of the next response on ``sock``, read whole: its head, then Content-Length bytes
    (or, without one, all until the server closes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += (chunk := sock.recv(65536))
        assert chunk, "closed before an answer"
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    while length is None or len(body) < int(length[1]):
        body += (chunk := sock.recv(65536))
        if not chunk:
            assert length is None, "closed inside an answer"
            break
    return int(head.split()[1])


def test_an_idle_keep_alive_connection_is_closed_after_the_setting(bare):
    with socket.create_connection(("127.0.0.1", bare), timeout=KEEP_ALIVE_S + 5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert status_of(sock) == 200
        answered = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server, not by the socket timeout (that would raise)
        assert KEEP_ALIVE_S - 0.2 < time.monotonic() - answered < KEEP_ALIVE_S + 1.5


def test_unfinished_headers_over_the_setting_get_400(bare):
    line = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n"
    for pad, expected in ((MAX_HEADER_BYTES - 200, 200), (MAX_HEADER_BYTES + 100, 400)):
        with socket.create_connection(("127.0.0.1", bare), timeout=5) as sock:
            sock.sendall(line + b"X-Pad: " + b"a" * pad)  # no end of headers yet: uvicorn holds what came
            time.sleep(0.3)
            ready = select.select([sock], [], [], 0)[0]
            if expected == 200:
                assert not ready, "refused under the limit"
                sock.sendall(b"\r\n\r\n")
            assert status_of(sock) == expected


def test_requests_past_the_connection_setting_get_503(bare):
    for idle, expected in ((MAX_CONNECTIONS - 2, 200), (MAX_CONNECTIONS - 1, 503)):
        others = [socket.create_connection(("127.0.0.1", bare), timeout=5) for _ in range(idle)]  # connected, silent
        try:
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", bare), timeout=5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
                assert status_of(sock) == expected
        finally:
            for other in others:
                other.close()
        time.sleep(0.3)  # uvicorn lets go of the closed ones
