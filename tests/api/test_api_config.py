"""The `[api]` table: off by default, `listen` parsed, TLS files both or neither; errors
name the key and exit 78, as for every other table."""

from __future__ import annotations

from pathlib import Path

import pytest

from api_support import api_config
from mailingest.config import ApiSettings, load_config
from mailingest.config_render import render_config
from mailingest.errors import ConfigError
from support import run_cli


def test_off_by_default(tmp_path: Path) -> None:
    assert load_config(api_config(tmp_path, ""), {}).api is None


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:8025", "127.0.0.1", 8025),
        ("[::1]:9000", "::1", 9000),
        ("api.lan:1", "api.lan", 1),
    ],
)
def test_listen(tmp_path: Path, listen: str, host: str, port: int) -> None:
    config = load_config(api_config(tmp_path, f'[api]\nlisten = "{listen}"\n'), {})
    assert config.api == ApiSettings(host, port)
    assert f'[api]\nhost = "{host}"\nport = {port}' in render_config(config)


def test_tls_paths_resolve_against_the_config(tmp_path: Path) -> None:
    text = '[api]\nlisten = "127.0.0.1:8443"\ntls_cert = "c.pem"\ntls_key = "k.pem"\n'
    api = load_config(api_config(tmp_path, text), {}).api
    assert api is not None and api.tls_cert == tmp_path / "c.pem"
    assert api.tls_key == tmp_path / "k.pem"


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[api]\nlisten = "8025"\n', "api.listen", 'expected "host:port"'),
        ('[api]\nlisten = "127.0.0.1:0"\n', "api.listen", 'expected "host:port"'),
        ('[api]\nlisten = "127.0.0.1:99999"\n', "api.listen", 'expected "host:port"'),
        ('[api]\nlisten = ":8025"\n', "api.listen", 'expected "host:port"'),
        ('[api]\nlisten = "h:\u00b2"\n', "api.listen", 'expected "host:port"'),
        ("[api]\nlisten = 8025\n", "api.listen", "expected a string"),
        ('[api]\ntls_cert = "c.pem"\n', "api.listen", "missing required key"),
        ('[api]\nlisten = "h:1"\ntls_cert = "c.pem"\n', "api.tls_key", "needs both"),
        ('[api]\nlisten = "h:1"\ntls_key = "k.pem"\n', "api.tls_cert", "needs both"),
        ('[api]\nlisten = "h:1"\nport = 2\n', "api.port", "unknown key"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(api_config(tmp_path, text), {})
    assert info.value.key_path == key
    assert problem in str(info.value)


def test_cli_exits_78_naming_the_key(tmp_path: Path) -> None:
    proc = run_cli(api_config(tmp_path, '[api]\nlisten = "nowhere"\n'), "config")
    assert proc.returncode == 78
    assert b"api.listen" in proc.stderr
