"""Config loading and validation: every problem listed, with its path and a hint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from at_gateway.config import (
    Overlay,
    build_config,
    find_config,
    load_config,
    parse_duration,
    parse_size,
    validate_provider,
)
from at_gateway.errors import ConfigError

GO_EXAMPLE = """\
api_key: ${GATEWAY_API_KEY}  # Required: Gateway API key
port: 8080  # Optional, defaults to PORT env var or 8080
default_timeout: 300s  # Optional, used when route steps don't specify timeout

providers:
  - name: cerebras
    api_key: ${CEREBRAS_API_KEY}
    base_url: https://api.cerebras.ai/v1

  - name: openrouter
    api_key: ${OPENROUTER_API_KEY}
    base_url: https://openrouter.ai/api/v1

routes:
  - name: dynamic/n8n  # Must match request model exactly
    steps:
      - provider: cerebras
        model: gpt-oss-120b
        timeout: 300s  # Optional, uses default_timeout if omitted
        conflict_resolution: tools  # Optional: "tools" or "format"
      - provider: openrouter
        model: nvidia/nemotron-3-nano-30b-a3b:free
        timeout: 300s
        conflict_resolution: format
"""
ENV = {"GATEWAY_API_KEY": "gw-secret-value", "CEREBRAS_API_KEY": "csk-123456", "OPENROUTER_API_KEY": "or-987654"}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_go_gateway_example_loads_unchanged(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GO_EXAMPLE), ENV)
    assert cfg.api_keys == ("gw-secret-value",)
    assert cfg.port == 8080
    assert cfg.providers["cerebras"].type == "openai"
    assert cfg.providers["openrouter"].api_key == "or-987654"
    route = cfg.routes["dynamic/n8n"]
    assert [(s.provider, s.model, s.timeout, s.conflict_resolution) for s in route.steps] == [
        ("cerebras", "gpt-oss-120b", 300.0, "tools"),
        ("openrouter", "nvidia/nemotron-3-nano-30b-a3b:free", 300.0, "format")]


def test_default_timeout_is_used(tmp_path: Path) -> None:
    text = GO_EXAMPLE.replace("        timeout: 300s  # Optional, uses default_timeout if omitted\n", "")
    text = text.replace("default_timeout: 300s", "default_timeout: 42s")
    cfg = load_config(write(tmp_path, text), ENV)
    assert cfg.routes["dynamic/n8n"].steps[0].timeout == 42.0


def test_every_problem_is_listed_with_path_and_hint(tmp_path: Path) -> None:
    text = GO_EXAMPLE.replace("        timeout: 300s\n        conflict_resolution: format",
                              "        timout: 300s\n        conflict_resolution: formt")
    text = text.replace("  - name: openrouter\n", "  - name: openrouter\n    bse_url: x\n")
    text += "  - name: other\n    steps:\n      - provider: nosuch\n        model: m\n        timeout: soon\n"
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text), ENV)
    msg = exc.value.render()
    assert str(tmp_path / "config.yaml") in msg
    assert "routes[0].steps[1].timout: unknown key (did you mean 'timeout'?)" in msg
    assert "routes[0].steps[1].conflict_resolution: must be one of tools, format" in msg
    assert "providers[1].bse_url: unknown key (did you mean 'base_url'?)" in msg
    assert "routes[1].steps[0].provider: unknown provider 'nosuch'" in msg
    assert "routes[1].steps[0].timeout: 'soon' is not a duration" in msg
    for secret in ENV.values():
        assert secret not in msg


@pytest.mark.parametrize(("raw", "problem"), [
    ({"providers": [], "routes": [], "store": {"path": ":memory:"}}, "api_key: no gateway key is configured"),
    ({"api_key": "${NOPE_NOT_SET}"}, "api_key: environment variable NOPE_NOT_SET is not set"),
    ({"api_key": "k", "providers": [{"name": "a", "base_url": "http://x"}, {"name": "a", "base_url": "http://y"}]},
     "providers[1].name: duplicate provider name 'a'"),
    ({"api_key": "k", "routes": [{"name": "r", "steps": []}]}, "routes[0].steps: a route needs at least one step"),
    ({"api_key": "k", "providers": [{"name": "a", "base_url": "http://x"}],
      "routes": [{"name": "r", "steps": [{"provider": "a", "model": "m"}]},
                 {"name": "r", "steps": [{"provider": "a", "model": "m"}]}]},
     "routes[1].name: duplicate route name 'r'"),
    ({"api_key": "k", "providers": [{"name": "a"}]}, "providers[0].base_url: required for type openai"),
    ({"api_key": "k", "providers": [{"name": "a", "type": "opneai", "base_url": "http://x"}]},
     "providers[0].type: unknown provider type 'opneai' (did you mean 'openai'?)"),
    ({"api_key": "k", "port": "eighty"}, "port: 'eighty' is not a whole number"),
    ({"api_key": "k", "prot": 1}, "prot: unknown key (did you mean 'port'?)"),
    ({"api_key": "k", "providers": [{"name": "a", "base_url": "http://x"}],
      "routes": [{"name": "r\t", "steps": [{"provider": "a", "model": "m"}]}]}, "routes[0].name: 'r\\t' has spaces"),
    ({"api_key": "k", "providers": [{"name": "a", "base_url": "http://x"}],
      "routes": [{"name": "r", "steps": [{"provider": "a", "model": "m\n"}]}]},
     "routes[0].steps[0].model: 'm\\n' has spaces"),
    ({"api_key": "k", "providers": [{"name": " a", "base_url": "http://x"}]}, "providers[0].name: ' a' has spaces"),
    ({"api_key": "k", "max_body_size": "huge"}, "max_body_size: 'huge' is not a size"),
    ({"api_key": "k", "stream_idle_timeout": "0s"}, "stream_idle_timeout: must be greater than zero"),
    ({"api_key": "k", "port": 70000}, "port: 70000 is out of range"),
    ({"api_key": "k", "default_timeout": 0}, "default_timeout: must be greater than zero"),
    ({"api_key": "k", "header_timeout": "0"}, "header_timeout: must be greater than zero"),
    ({"api_key": "k", "upstream": {"connect_timeout": "0ms"}}, "upstream.connect_timeout: must be greater than zero"),
])
def test_problems(raw: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_config(raw, "c.yaml", {})
    assert any(p.startswith(problem) for p in exc.value.problems), exc.value.problems


def test_env_defaults_and_port_env() -> None:
    cfg = build_config({"api_key": "${K:-fallback}"}, "c", {"PORT": "9999"})
    assert cfg.api_keys == ("fallback",) and cfg.port == 9999
    cfg = build_config({"api_keys": ["a", "${B}"], "port": "${P:-81}"}, "c", {"B": "bee"})
    assert cfg.api_keys == ("a", "bee") and cfg.port == 81


@pytest.mark.parametrize(("text", "seconds"), [
    ("300s", 300), ("5m", 300), ("1.5s", 1.5), (30, 30), ("45", 45), ("250ms", 0.25), ("1m30s", 90), ("1h", 3600),
    ("30d", 30 * 86400), ("2w", 14 * 86400), ("1d12h", 129600)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "s", "5x", "-1", "1s2", True, None])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_sizes() -> None:
    assert parse_size("10MiB") == 10 * 2**20
    assert parse_size("1k") == 1000
    assert parse_size(512) == 512


def test_find_config_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("api_key: k\n")
    assert find_config("x.yaml", {}) == Path("x.yaml")
    assert find_config(None, {"AT_GATEWAY_CONFIG": "/a/b.yaml"}) == Path("/a/b.yaml")
    assert find_config(None, {}) == Path("./config.yaml")


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "api_key: k\nroutes: [\n"), {})
    assert "line" in exc.value.render()


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, **(env or {})}
    full_env.pop("AT_GATEWAY_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "at_gateway", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=30)


def test_check_config_cli(tmp_path: Path) -> None:
    good = write(tmp_path, GO_EXAMPLE)
    r = run_cli("check-config", "--config", str(good), env=ENV)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(GO_EXAMPLE.replace("        timeout: 300s\n        conflict_resolution: format",
                                      "        timout: 300s"))
    r = run_cli("check-config", "--config", str(bad), env=ENV)
    assert r.returncode == 1
    assert "routes[0].steps[1].timout: unknown key (did you mean 'timeout'?)" in r.stderr
    assert str(bad) in r.stderr
    assert "Traceback" not in r.stderr
    assert "gw-secret-value" not in r.stderr


def test_no_config_found_is_clear(tmp_path: Path) -> None:
    r = run_cli("check-config", cwd=tmp_path)
    if Path("/etc/at-gateway/config.yaml").exists():
        pytest.skip("a system config exists")
    assert r.returncode == 1
    assert "no configuration file found" in r.stderr


def test_version_does_not_import_server() -> None:
    code = ("import sys; from at_gateway.cli import main; main(['version']); "
            "bad = [m for m in ('at_gateway.http.server', 'at_gateway.http.pool', 'cryptography', 'anyio') "
            "if m in sys.modules]; print('IMPORTED', bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "at-gateway" in r.stdout and "IMPORTED []" in r.stdout


def test_check_config_does_not_import_server(tmp_path: Path) -> None:
    p = write(tmp_path, GO_EXAMPLE)
    code = ("import sys; from at_gateway.cli import main; main(['check-config', '--config', %r]); "
            "bad = [m for m in ('at_gateway.http.server', 'at_gateway.http.pool', 'cryptography', 'anyio') "
            "if m in sys.modules]; print('IMPORTED', bad)") % str(p)
    import os
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env={**os.environ, **ENV})
    assert "IMPORTED []" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(("provider", "problem"), [
    ({"name": "a", "type": "anthropic", "api_key": "k", "max_tokens": 0},
     "providers[0].max_tokens: must be a positive"),
    ({"name": "a", "type": "anthropic", "api_key": "k", "max_tokens": "many"}, "providers[0].max_tokens: must be"),
    ({"name": "a", "type": "anthropic", "api_key": "k", "anthropic_version": ""},
     "providers[0].anthropic_version: must be a non-empty string"),
    ({"name": "g", "type": "gemini", "api_key": "k", "safety_settings": "block"},
     "providers[0].safety_settings: must be a list"),
    ({"name": "v", "type": "vertex", "api": "grpc"}, "providers[0].api: must be one of auto, gemini, openai"),
    ({"name": "v", "type": "vertex", "token_url": "ftp://x"}, "providers[0].token_url: must start with http"),
])
def test_provider_type_options_are_checked(provider: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        build_config({"api_key": "k", "providers": [provider]}, "c.yaml", {})
    assert any(p.startswith(problem) for p in exc.value.problems), exc.value.problems


def test_example_config_loads_with_no_environment() -> None:
    cfg = load_config(Path(__file__).parent.parent / "config.yaml.example", {})
    assert "demo" in cfg.routes and cfg.providers["echo"].type == "echo"
    assert cfg.host == "127.0.0.1" and cfg.port == 8080


def test_options_before_the_command_are_kept(tmp_path: Path) -> None:
    """`--config X check-config` and `--config X serve` use X (a subcommand's defaults must not reset it)."""
    good = write(tmp_path, GO_EXAMPLE)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    r = run_cli("--config", str(good), "check-config", env=ENV, cwd=empty)
    assert r.returncode == 0 and str(good) in r.stdout, r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("api_key: k\nprot: 1\n")
    r = run_cli("--config", str(bad), "serve", cwd=empty)
    assert r.returncode == 1 and "prot: unknown key" in r.stderr and str(bad) in r.stderr, r.stderr


def test_out_of_range_ports_are_problems_not_tracebacks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        build_config({"api_key": "k"}, "c.yaml", {"PORT": "99999"})
    assert exc.value.problems == ["port: not set, and $PORT (99999) is out of range (0..65535)"]
    assert build_config({"api_key": "k", "port": 81}, "c.yaml", {"PORT": "99999"}).port == 81
    r = run_cli("serve", "--config", str(write(tmp_path, "api_key: k\n")), "--port", "70000")
    assert r.returncode == 2 and "not a port number" in r.stderr and "Traceback" not in r.stderr


def test_request_log_retention_in_days() -> None:
    """The README's and the issue's form, `request_log: {retention: 30d}`."""
    cfg = build_config({"api_key": "k", "request_log": {"retention": "30d"}}, "c", {})
    assert cfg.request_log_retention == 30 * 86400


# -- one provider as the admin API checks it (validate_provider), and the YAML's header and secret rules -------

VX = {"name": "vx", "type": "vertex", "project": "p"}


@pytest.mark.parametrize(("spec", "problems"), [
    ({**VX, "credentials_file": "/etc/passwd", "api_key": "k"}, ["provider.credentials_file: not allowed"]),
    ({**VX, "token_url": "https://evil.example/token", "api_key": "k"}, ["provider.token_url: not allowed"]),
    (VX, ["provider.api_key: required for a vertex provider stored in the database"]),
    ({**VX, "api_keys": ["k1", "k2"]}, ["provider.api_key: required for a vertex"]),  # a pool is not express mode
    ({**VX, "credentials_file": "/x", "token_url": "https://t.example"},
     ["provider.credentials_file: not allowed", "provider.token_url: not allowed", "provider.api_key: required"]),
    ({"name": "o", "type": "openai", "base_url": "http://h", "token_url": "https://t.example"},
     ["provider.token_url: unknown key", "provider.token_url: not allowed"]),
])
def test_a_database_provider_cannot_use_the_hosts_credentials_or_files(spec: dict, problems: list[str]) -> None:
    built, got = validate_provider(spec, source="database")
    assert built is None and len(got) == len(problems), got
    for want in problems:
        assert sum(1 for p in got if p.startswith(want)) == 1, (want, got)
    # the config file, written by the operator, may (the type's own rules aside)
    assert not [p for p in validate_provider(spec)[1] if "not allowed" in p or "required for a vertex" in p]


def test_a_database_vertex_provider_with_an_api_key_is_express_mode() -> None:
    built, problems = validate_provider({**VX, "api_key": "AIza-key"}, source="database")
    assert problems == [] and built is not None and built.api_key == "AIza-key"


@pytest.mark.parametrize("name, problem", [
    ("X-A\r\nX-Injected", "is not a valid header name"), ("Bad Name", "is not a valid header name"),
    ("", "is not a valid header name"), ("X-A:", "is not a valid header name"), ("Ünïcode", "is not a valid"),
    *[(n, "is set by the gateway") for n in ("Host", "content-length", "Transfer-Encoding", "connection",
                                             "Keep-Alive", "TE", "trailer", "upgrade", "expect", "proxy-connection")],
])
def test_provider_header_names_are_tokens_and_not_the_connections(name: str, problem: str) -> None:
    spec = {"name": "h", "type": "openai", "base_url": "http://h", "headers": {name: "v", "X-Fine": "ok"}}
    _, problems = validate_provider(spec)
    assert len(problems) == 1 and problem in problems[0], problems
    assert problems[0].startswith("provider.headers."), problems
    assert "\r" not in problems[0] and "\n" not in problems[0]  # the path of a name with CRLF is quoted
    with pytest.raises(ConfigError) as exc:  # the YAML alike
        build_config({"api_key": "k", "providers": [{**spec}]}, "c.yaml", {})
    assert [p for p in exc.value.problems if problem in p] and \
        all(p.startswith("providers[0].headers.") for p in exc.value.problems)


def test_valid_header_names_pass() -> None:
    names = ["X-Org", "OpenAI-Beta", "anthropic-version", "x_under", "a!#$%&'*+-.^_`|~9"]
    built, problems = validate_provider({"name": "h", "type": "openai", "base_url": "http://h",
                                         "headers": {n: "v" for n in names}})
    assert problems == [] and built is not None and list(built.headers) == names


@pytest.mark.parametrize("spec, path", [
    ({"api_key": "enc:v1:abc:def"}, "provider.api_key"),
    ({"api_keys": ["ok-key", "enc:v1:abc:def"]}, "provider.api_keys[1]"),
    ({"api_keys": [{"key": "enc:v1:abc:def", "weight": 2}]}, "provider.api_keys[0].key"),
    ({"headers": {"X-A": "enc:v1:abc:def"}}, "provider.headers.X-A"),
])
def test_a_value_in_the_stores_encrypted_form_is_refused_with_its_path(spec: dict, path: str) -> None:
    """What the store writes encrypted values as: stored without a key it would read back as an undecryptable
    token (a 409 from the store, before), with a key it would be sealed as if it were the secret."""
    _, problems = validate_provider({"name": "p", "type": "openai", "base_url": "http://h", **spec})
    assert problems == [f"{path}: starts with enc:v1:, the store's prefix for encrypted values (send the value "
                        "itself)"]


def test_secret_bearing_fields_are_not_in_reprs() -> None:
    built, _ = validate_provider({"name": "p", "type": "openai", "base_url": "http://h", "api_key": "sk-repr-leak-1",
                                  "headers": {"X-S": "hdr-repr-leak-2"}, "proxy": "http://u:pw-repr-leak-3@p:1"})
    text = repr(built) + repr(Overlay(providers=({"name": "p", "api_key": "sk-repr-leak-1"},)))
    assert "repr-leak" not in text and "name='p'" in text


# -- files a provider's config names: vertex's credentials_file --------------------------------------------

def _authorized_user(path: Path, pad: int = 0) -> Path:
    path.write_text(json.dumps({"type": "authorized_user", "client_id": "c", "client_secret": "s",
                                "refresh_token": "r", "pad": "x" * pad}))
    return path


def test_credentials_file_is_read_when_a_small_regular_file(tmp_path: Path) -> None:
    from at_gateway.providers.vertex import load_credentials

    creds = load_credentials(str(_authorized_user(tmp_path / "adc.json")), "credentials_file")
    assert creds.kind == "authorized_user" and creds.info["client_id"] == "c"


@pytest.mark.parametrize("kind, reason", [
    ("device", "is not a regular file"), ("directory", "is not a regular file"), ("fifo", "is not a regular file"),
    ("large", "is larger than 64 KiB"), ("missing", "does not exist"), ("not-json", "is not JSON"),
])
def test_credentials_file_other_than_a_small_regular_file_is_refused_unread(tmp_path: Path, kind: str,
                                                                            reason: str) -> None:
    """A device (/dev/zero would be read forever), a FIFO (opening it would hang the token fetch), a directory
    or a big file: refused from the open descriptor, naming the file and the reason, never its contents."""
    from at_gateway.errors import StepFailed
    from at_gateway.providers.vertex import MAX_CREDENTIALS_FILE, load_credentials

    path = {"device": "/dev/zero", "directory": str(tmp_path), "missing": str(tmp_path / "none.json")}.get(kind)
    if kind == "fifo":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    elif kind == "large":
        path = str(_authorized_user(tmp_path / "big.json", MAX_CREDENTIALS_FILE))
    elif kind == "not-json":
        path = str(tmp_path / "secret.txt")
        Path(path).write_text("internal-secret-kind-XYZ")
    assert path is not None
    with pytest.raises(StepFailed) as exc:
        load_credentials(path, "credentials_file")
    assert reason in exc.value.message and repr(path) in exc.value.message, exc.value.message
    assert "XYZ" not in exc.value.message


@pytest.mark.parametrize("base_url, secret", [
    ("http://u:userinfo-pass-xyz@127.0.0.1:1/v1", "userinfo-pass-xyz"),
    ("http://u:p%40ss-word-123@127.0.0.1:1/v1", "p@ss-word-123"),
    ("https://h.example/v1?api-key=sk-in-query-zzz&x=1", "sk-in-query-zzz"),
    ("https://h.example/v1?token=tok-abcdef123", "tok-abcdef123"),
    ("https://h.example/v1?sig=sv2025signature", "sv2025signature"),
])
def test_credentials_in_a_base_url_are_redacted_by_value(base_url: str, secret: str) -> None:
    cfg = build_config({"api_key": "gateway-key-123", "store": {"path": ":memory:"},
                        "providers": [{"name": "p", "type": "openai", "base_url": base_url}], "routes": []}, "t")
    assert secret in cfg.secrets()
    plain = build_config({"api_key": "gateway-key-123", "store": {"path": ":memory:"},
                          "providers": [{"name": "p", "type": "openai", "base_url": "https://h.example/v1?x=12345"}],
                          "routes": []}, "t")
    assert "12345" not in plain.secrets()
