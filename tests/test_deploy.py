"""The deployment files stay consistent with the code; Docker Compose itself renders them where this machine has it (no engine runs here)."""

import ast
import copy
import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_runs_a_checked_gateway_behind_the_proxy_and_an_edge_client_through_it():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    server, proxy, edge = (compose["services"][name] for name in ("server", "proxy", "edge"))
    for service in (server, proxy, edge):
        assert (ROOT / service["build"]["dockerfile"]).is_file()
    assert "/readyz" in " ".join(server["healthcheck"]["test"])
    assert "ports" not in server and server["expose"] == ["8000"]  # on the compose network only
    assert proxy["environment"]["PROXY_UPSTREAM"] == "server:8000" and proxy["depends_on"] == ["server"]
    assert "http://127.0.0.1:8080/healthz" in proxy["healthcheck"]["test"]  # the proxy's plain port, through to the gateway
    assert edge["depends_on"]["server"]["condition"] == edge["depends_on"]["proxy"]["condition"] == "service_healthy"
    command = edge["command"]
    assert command[0] == "encode" and command[command.index("--server") + 1] == "http://proxy:8080"
    assert Path(command[1]).name in {p.name for p in (ROOT / "shared/comneck/assets").glob("*.png")}
    assert list(edge["environment"]) == ["COMNECK_API_KEY"]  # passed through for a server with keys


def test_the_proxy_image_is_the_pinned_official_nginx_with_the_template_and_the_certificate_script():
    dockerfile = (ROOT / "docker/Dockerfile.proxy").read_text()
    assert re.search(r"^FROM nginx:\d+\.\d+\.\d+-alpine$", dockerfile, re.M)  # a pinned release, not a moving tag
    assert "COPY docker/nginx/comneck.conf.template /etc/nginx/templates/comneck.conf.template" in dockerfile
    assert re.search(r"^COPY docker/nginx/comneck-tls\.sh /docker-entrypoint\.d/\d+-comneck-tls\.sh$", dockerfile, re.M)
    assert (ROOT / "docker/nginx/comneck-tls.sh").stat().st_mode & 0o111  # the image's entrypoint runs only executable scripts
    assert "ENV NGINX_ENVSUBST_FILTER=^PROXY_" in dockerfile and "apk add --no-cache openssl" in dockerfile
    # every name the template reads is one compose gives the image (nginx's own $variables are left alone)
    template = (ROOT / "docker/nginx/comneck.conf.template").read_text()
    environment = _compose()["services"]["proxy"]["environment"]
    assert set(re.findall(r"\$\{(PROXY_\w+)\}", template)) == set(environment) - {"PROXY_TLS_NAMES"}  # that one: the script's
    assert not re.findall(r"\$\{(?!PROXY_)", template)


def test_the_proxy_takes_bodies_as_large_as_the_gateway_does():
    environment = _compose()["services"]["proxy"]["environment"]
    match = re.fullmatch(r"\$\{COMNECK_MAX_BODY_BYTES:-(\d+)\}", environment["PROXY_MAX_BODY_BYTES"])
    assert match and _settings_defaults()["COMNECK_MAX_BODY_BYTES"] == "8 << 20" and int(match[1]) == 8 << 20


def test_dockerfiles_start_installed_commands():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    server = (ROOT / "docker/Dockerfile.server").read_text()
    edge = (ROOT / "docker/Dockerfile.edge").read_text()
    assert re.search(r'^CMD \["comneck-server"\]', server, re.M) and "comneck-server" in scripts
    assert re.search(r'^ENTRYPOINT \["comneck-edge"\]', edge, re.M) and "comneck-edge" in scripts
    assert "COMNECK_HOST=0.0.0.0" in server and "COMNECK_PORT=8000" in server


def _pip_installs(dockerfile: str) -> list[str]:
    """The pip install commands of a Dockerfile's RUN lines (continuations joined, split at &&)."""
    text = dockerfile.replace("\\\n", " ")
    runs = [line[4:] for line in text.splitlines() if line.startswith("RUN ")]
    return [part.strip() for run in runs for part in run.split("&&") if re.search(r"\bpip3? install", part)]


def test_images_install_the_lock_then_the_project_alone():
    for name, lock in (("server", "server"), ("edge", "edge")):
        dockerfile = (ROOT / f"docker/Dockerfile.{name}").read_text()
        installs = _pip_installs(dockerfile.replace("${LOCK}", lock))
        assert f"ARG LOCK={lock}\n" in dockerfile and (ROOT / f"requirements/{lock}-cpu.txt").is_file()  # --build-arg LOCK=NAME-cpu
        assert installs[0] == f"pip install -r requirements/{lock}.txt"
        for command in installs:
            named = re.findall(r"-r (\S+)", command)
            assert named or "--no-deps" in command, command  # nothing resolved outside the lock
            for path in named:
                assert re.fullmatch(r"requirements/[\w-]+\.txt", path) and (ROOT / path).is_file(), path
        # the project itself: no dependencies, and the lock's setuptools as its build backend
        assert installs[-1] == "pip install --no-deps --no-build-isolation ."
        lock_text = (ROOT / f"requirements/{lock}.txt").read_text()
        for pin in ("torch", "torchvision", "setuptools", "wheel"):
            assert re.search(rf"^{pin}==", lock_text, re.M), pin


def _settings_defaults() -> dict[str, object]:
    """COMNECK_<FIELD> -> the literal default of each ServerSettings field, read from the source
    (importing the settings would import torch)."""
    tree = ast.parse((ROOT / "cloud_server/comneck_server/settings.py").read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ServerSettings").body
    fields = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and node.target.id != "model_config":
            call = node.value
            default = call.args[0] if isinstance(call, ast.Call) and call.args else call
            try:
                fields[f"COMNECK_{node.target.id.upper()}"] = ast.literal_eval(default)
            except ValueError:  # an expression such as 8 << 20: kept as its text
                fields[f"COMNECK_{node.target.id.upper()}"] = ast.unparse(default)
    return fields


def _compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


# Compose-only names: where the host publishes the proxy, the names its certificate is made for
# (not settings of the gateway).
PUBLISH = {"COMNECK_PUBLISH_HOST", "COMNECK_PUBLISH_PORT", "COMNECK_TLS_NAMES"}
# Settings whose compose default is not the gateway's own, on purpose: the compose stack has a Redis.
COMPOSE_DEFAULTS = {"COMNECK_SUPPORT_STORE": "redis://redis:6379/0"}


def test_compose_forwards_every_gateway_setting_with_the_gateways_defaults():
    settings = _settings_defaults()
    assert {"COMNECK_DEVICE", "COMNECK_API_KEYS", "COMNECK_LOG_LEVEL"} <= set(settings)
    environment = _compose()["services"]["server"]["environment"]
    # all but host and port, which the image fixes (0.0.0.0:8000, published and health-checked)
    assert set(environment) == set(settings) - {"COMNECK_HOST", "COMNECK_PORT"}
    assert not PUBLISH & set(settings)
    for name, value in environment.items():
        if value is None:
            continue  # passed through from the shell when set there, else the gateway's default
        match = re.fullmatch(r"\$\{(\w+):-([^}]*)\}", value)
        assert match and match[1] == name, value  # the shell's value wins over the default
        assert match[2] == COMPOSE_DEFAULTS.get(name, settings[name]), name  # and the default is the gateway's own
    assert settings["COMNECK_SUPPORT_STORE"] == "memory"


def test_compose_keeps_support_sets_in_its_redis_for_every_replica():
    services = _compose()["services"]
    server, redis = services["server"], services["redis"]
    assert redis["image"] == "redis:7-alpine" and "ports" not in redis  # the official image, on the compose network only
    assert server["depends_on"] == ["redis"] and "redis-cli" in redis["healthcheck"]["test"]
    url = re.fullmatch(r"\$\{COMNECK_SUPPORT_STORE:-(.+)\}", server["environment"]["COMNECK_SUPPORT_STORE"])[1]
    assert url == "redis://redis:6379/0" and redis["expose"] == ["6379"]  # the service's name and port
    assert "redis-data:/data" in redis["volumes"] and "redis-data" in _compose()["volumes"]


def test_docs_name_only_forwarded_settings():
    settings, environment = _settings_defaults(), _compose()["services"]["server"]["environment"]
    named = set(re.findall(r"COMNECK_[A-Z_]+[A-Z]", (ROOT / "docs/deploy.md").read_text()))
    for name in named - PUBLISH - {"COMNECK_API_KEY"}:  # the edge client's key, given to the edge service
        assert name in settings, name
        assert name in environment or name in {"COMNECK_HOST", "COMNECK_PORT"}, name
    assert PUBLISH <= named


def test_published_port_is_the_proxys_tls_port_on_localhost_unless_told_otherwise():
    (port,) = _compose()["services"]["proxy"]["ports"]
    assert port == "${COMNECK_PUBLISH_HOST:-127.0.0.1}:${COMNECK_PUBLISH_PORT:-8443}:8443"
    assert _compose()["services"]["proxy"]["environment"]["PROXY_HTTPS_LISTEN"] == "8443"
    docs = (ROOT / "docs/deploy.md").read_text()
    assert "COMNECK_PUBLISH_HOST=0.0.0.0" in docs and "COMNECK_API_KEYS=" in docs


def test_gpu_override_reserves_a_gpu_and_runs_on_it():
    server = _compose("docker-compose.gpu.yml")["services"]["server"]
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
    assert server["environment"] == {"COMNECK_DEVICE": "${COMNECK_DEVICE:-cuda}"}
    assert "docker compose -f docker-compose.yml -f docker-compose.gpu.yml" in (ROOT / "docs/deploy.md").read_text()


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` out: a pattern matches it or a folder above it
    (a leading **/ matches at any depth)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        deep = pattern.startswith("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1] if deep else prefix, pattern.removeprefix("**/")):
                return True
    return False


def test_dockerignore_keeps_weights_and_local_environments_out():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in ("weights/d1_1.pth.tar", ".venv/bin/python", ".venv-lock/bin/uv", ".git/HEAD",
                 "dist/comneck-0.1.0-py3-none-any.whl", "build/lib/comneck/__init__.py",
                 "runs/d1/last.safetensors", "shared/comneck.egg-info/PKG-INFO", "torch-2.14.1.whl",
                 "cloud_server/comneck_server/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "requirements/server.txt", "shared/comneck/assets/cow_beach.png",
                 "cloud_server/comneck_server/settings.py", "edge_client/comneck_edge/cli.py"):
        assert not _ignored(path, patterns), path


def _compose_cli() -> list[str] | None:
    """Docker Compose's own CLI where this machine has one (`docker compose` v2, else v1's `docker-compose`)."""
    import shutil
    import subprocess

    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def _rendered(cli: list[str], env: dict[str, str], *files: str) -> dict:
    """What Compose makes of the files with the shell's `env` (`config` needs no engine)."""
    import os
    import subprocess

    clean = {k: v for k, v in os.environ.items() if not k.startswith("COMNECK_")}
    args = [part for name in files for part in ("-f", str(ROOT / name))]
    run = subprocess.run([*cli, *args, "config"], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return yaml.safe_load(run.stdout)["services"]


def _published(service: dict) -> tuple[str, int]:
    (port,) = service["ports"]
    if isinstance(port, str):  # v1: "HOST:PUBLISHED:TARGET/tcp"
        host, published, _ = port.split(":")
        return host, int(published)
    return port["host_ip"], int(port["published"])


def test_compose_itself_renders_what_the_docs_say():
    """The operator's commands, rendered by Docker Compose (no engine needed): CPU behind the proxy
    on localhost by default, COMNECK_* forwarded from the shell (the body limit to both), the GPU
    override reserving a GPU."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose on this machine (apt-get install docker-compose)")
    plain = _rendered(cli, {}, "docker-compose.yml")
    assert plain["server"]["environment"]["COMNECK_DEVICE"] == "cpu" and "deploy" not in plain["server"]
    assert plain["server"]["environment"]["COMNECK_SUPPORT_STORE"] == "redis://redis:6379/0"
    assert _published(plain["proxy"]) == ("127.0.0.1", 8443) and "ports" not in plain["server"]
    assert str(plain["proxy"]["environment"]["PROXY_MAX_BODY_BYTES"]) == str(8 << 20)
    asked = _rendered(cli, {"COMNECK_DEVICE": "cuda", "COMNECK_MAX_QUEUE": "4", "COMNECK_PUBLISH_HOST": "0.0.0.0",
                            "COMNECK_MAX_BODY_BYTES": "1000"}, "docker-compose.yml")
    server, proxy = asked["server"]["environment"], asked["proxy"]["environment"]
    assert (server["COMNECK_DEVICE"], str(server["COMNECK_MAX_QUEUE"])) == ("cuda", "4")
    assert str(server["COMNECK_MAX_BODY_BYTES"]) == str(proxy["PROXY_MAX_BODY_BYTES"]) == "1000"
    assert _published(asked["proxy"]) == ("0.0.0.0", 8443)
    gpu = _rendered(cli, {}, "docker-compose.yml", "docker-compose.gpu.yml")["server"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["environment"]["COMNECK_DEVICE"] == "cuda" and device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def _k8s() -> dict[tuple[str, str], dict]:
    """deploy/k8s/gateway.yaml's objects by (kind, name)."""
    objects = [o for o in yaml.safe_load_all((ROOT / "deploy/k8s/gateway.yaml").read_text()) if o]
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_the_kubernetes_manifest_validates_against_the_kubernetes_schemas():
    """Every object is valid Kubernetes 1.30 (strict: no unknown field), checked with the schemas
    kubernetes-validate bundles, no cluster; a misspelt field fails the same check."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (requirements/dev.txt)")
    manifest = _k8s()
    assert set(manifest) == {("Deployment", "comneck-gateway"), ("Service", "comneck-gateway"),
                             ("Deployment", "comneck-redis"), ("Service", "comneck-redis")}
    for resource in manifest.values():
        kubernetes_validate.validate(resource, "1.30.0", strict=True)
    misspelt = copy.deepcopy(manifest["Deployment", "comneck-gateway"])
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, "1.30.0", strict=True)


def _only_container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _selects(service: dict, deployment: dict) -> bool:
    """Whether ``service`` routes to ``deployment``'s pods, on a port the container names."""
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    named = {port["name"] for port in _only_container(deployment)["ports"]}
    return service["spec"]["selector"].items() <= labels.items() and all(p["targetPort"] in named for p in service["spec"]["ports"])


def test_the_kubernetes_gateways_are_probed_where_they_answer_and_share_one_redis():
    manifest = _k8s()
    gateway, redis = manifest["Deployment", "comneck-gateway"], manifest["Deployment", "comneck-redis"]
    container = _only_container(gateway)
    (port,) = container["ports"]
    assert port["containerPort"] == 8000 and "COMNECK_PORT=8000" in (ROOT / "docker/Dockerfile.server").read_text()
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert gateway["spec"]["replicas"] > 1 and {"requests", "limits"} <= set(container["resources"])
    env = {variable["name"]: variable for variable in container["env"]}
    assert set(env) <= set(_settings_defaults())  # every variable is a gateway setting
    assert env["COMNECK_SUPPORT_STORE"]["value"] == "redis://comneck-redis:6379/0"
    assert _selects(manifest["Service", "comneck-gateway"], gateway) and _selects(manifest["Service", "comneck-redis"], redis)
    assert manifest["Service", "comneck-redis"]["spec"]["ports"][0]["port"] == 6379
    assert _only_container(redis)["image"] == "redis:7-alpine"


def test_vllm_override_serves_the_converted_lm_with_prompt_embeds_beside_a_gateway_pointing_at_it():
    from comneck.backends import parse_backend_arg

    services = _compose("docker-compose.vllm.yml")["services"]
    vllm, server = services["vllm"], services["server"]
    assert vllm["image"].startswith("vllm/vllm-openai:") and "ports" not in vllm and vllm["expose"] == ["8000"]
    assert {"--enable-prompt-embeds", "--served-model-name=lm", "--port=8000"} <= set(vllm["command"])
    assert vllm["command"][0].startswith("--model=/models/") and vllm["volumes"] == ["./weights:/models:ro"]
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert server["depends_on"] == {"vllm": {"condition": "service_healthy"}}
    default = server["environment"]["COMNECK_BACKEND"].removeprefix("${COMNECK_BACKEND:-").removesuffix("}")
    arg = parse_backend_arg(default)  # the registry takes it as written
    assert arg.options == {"engine": "vllm", "engine_url": "http://vllm:8000", "engine_model": "lm"}
    assert "docker-compose.vllm.yml" in (ROOT / "docs/deploy.md").read_text()
