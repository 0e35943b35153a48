"""Upstreams behind a forward proxy: a real proxy on 127.0.0.1 (tests/fakes/forward_proxy.py)
and upstreams on 127.0.0.2. The proxy is used exactly when the daemon's environment
(HTTPS_PROXY / HTTP_PROXY) or the provider's `proxy:` says so, and not when NO_PROXY matches."""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from tests.conftest import UPSTREAM_KEY, ProxyFactory
from tests.fakes.forward_proxy import ForwardProxy
from tests.fakes.openai import OpenAIFake

HELLO = [{"role": "user", "content": "hello"}]
ENV_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")


@pytest.fixture
async def forward_proxy(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ForwardProxy]:
    for name in ENV_NAMES:  # whatever the machine running the tests has set
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    fp = await ForwardProxy().start()
    yield fp
    await fp.close()


@pytest.fixture
async def far_fake(aiohttp_server: Any) -> OpenAIFake:
    """The strict OpenAI fake on another loopback address than the proxy's."""
    fake = OpenAIFake(key=UPSTREAM_KEY)
    server = await aiohttp_server(fake.app, host="127.0.0.2")
    fake.base_url = f"http://127.0.0.2:{server.port}/v1"  # type: ignore[attr-defined]
    return fake


@pytest.fixture
async def tls_fake(tmp_path: Path) -> AsyncIterator[tuple[OpenAIFake, str, str]]:
    """The fake over https on 127.0.0.2 with a certificate from a throwaway CA: (fake, its
    base URL, the CA bundle that trusts it)."""
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.2").configure_cert(server_ctx)
    fake = OpenAIFake(key=UPSTREAM_KEY)
    runner = web.AppRunner(fake.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.2", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"https://127.0.0.2:{port}/v1", str(bundle)
    await runner.cleanup()


def config(base_url: str, **provider: Any) -> dict[str, Any]:
    return {
        "providers": [{"name": "far", "type": "openai", "base_url": base_url, "api_key": UPSTREAM_KEY, **provider}],
        "models": [{"name": "gpt-*", "provider": "far"}],
    }


async def chat(url: str) -> dict[str, Any]:
    # aiohttp as the test's client: it ignores the proxy variables set for the daemon.
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO}) as r:
            assert r.status == 200, await r.text()
            return await r.json()


@pytest.mark.parametrize("var", ["HTTP_PROXY", "http_proxy"])
async def test_the_environment_sends_http_upstreams_through_the_proxy(
    make_proxy: ProxyFactory, forward_proxy: ForwardProxy, far_fake: OpenAIFake, monkeypatch: pytest.MonkeyPatch, var: str
) -> None:
    """With HTTP_PROXY set, a plain-http upstream is asked for through the proxy (absolute form)."""
    monkeypatch.setenv(var, forward_proxy.url)
    p = await make_proxy(config(far_fake.base_url))  # type: ignore[attr-defined]
    answer = await chat(p.url)
    assert answer["choices"][0]["message"]["content"] == OpenAIFake.reply_for(HELLO)
    assert forward_proxy.seen == [("POST", f"{far_fake.base_url}/chat/completions")]  # type: ignore[attr-defined]


async def test_no_proxy_goes_direct(
    make_proxy: ProxyFactory, forward_proxy: ForwardProxy, far_fake: OpenAIFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NO_PROXY naming the upstream's host bypasses the proxy from the environment."""
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.2")
    p = await make_proxy(config(far_fake.base_url))  # type: ignore[attr-defined]
    await chat(p.url)
    assert forward_proxy.seen == [] and len(far_fake.seen) == 1


async def test_no_proxy_settings_go_direct(make_proxy: ProxyFactory, forward_proxy: ForwardProxy, far_fake: OpenAIFake) -> None:
    """Without proxy variables or `proxy:`, the upstream is reached directly."""
    p = await make_proxy(config(far_fake.base_url))  # type: ignore[attr-defined]
    await chat(p.url)
    assert forward_proxy.seen == [] and len(far_fake.seen) == 1


async def test_a_providers_proxy_setting_wins(
    make_proxy: ProxyFactory, forward_proxy: ForwardProxy, far_fake: OpenAIFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`proxy:` sends one provider through a proxy the environment does not name, and
    `proxy: direct` keeps one off a proxy the environment names."""
    p = await make_proxy(config(far_fake.base_url, proxy=forward_proxy.url))  # type: ignore[attr-defined]
    await chat(p.url)
    assert len(forward_proxy.seen) == 1
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    p = await make_proxy(config(far_fake.base_url, proxy="direct"))  # type: ignore[attr-defined]
    await chat(p.url)
    assert len(forward_proxy.seen) == 1 and len(far_fake.seen) == 2


async def test_https_upstreams_tunnel_through_the_proxy_and_still_check_tls(
    make_proxy: ProxyFactory, forward_proxy: ForwardProxy, tls_fake: tuple[OpenAIFake, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY: an https upstream is reached with CONNECT, its certificate checked end to
    end against the provider's `ca_bundle` (the proxy sees only the tunnel)."""
    fake, url, bundle = tls_fake
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    p = await make_proxy(config(url, ca_bundle=bundle))
    await chat(p.url)
    assert forward_proxy.seen == [("CONNECT", url.removeprefix("https://").removesuffix("/v1"))] and len(fake.seen) == 1


async def test_proxy_credentials_go_as_proxy_authorization(
    make_proxy: ProxyFactory, forward_proxy: ForwardProxy, far_fake: OpenAIFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`user:password@` in a proxy URL (from `proxy:` or the environment) is sent to the proxy
    as Basic Proxy-Authorization."""
    with_user = forward_proxy.url.replace("http://", "http://alice:s3cret@")
    p = await make_proxy(config(far_fake.base_url, proxy=with_user))  # type: ignore[attr-defined]
    await chat(p.url)
    monkeypatch.setenv("HTTP_PROXY", with_user)
    p = await make_proxy(config(far_fake.base_url))  # type: ignore[attr-defined]
    await chat(p.url)
    assert forward_proxy.auth == ["Basic " + base64.b64encode(b"alice:s3cret").decode()] * 2
    assert p.state.redactor("proxy password s3cret") == "proxy password [REDACTED]"


async def test_proxy_credentials_go_on_the_connect_of_an_https_upstream(
    make_proxy: ProxyFactory, forward_proxy: ForwardProxy, tls_fake: tuple[OpenAIFake, str, str]
) -> None:
    """Through a tunnel the credentials go on the CONNECT (the upstream never sees them)."""
    fake, url, bundle = tls_fake
    with_user = forward_proxy.url.replace("http://", "http://alice:s3cret@")
    p = await make_proxy(config(url, ca_bundle=bundle, proxy=with_user))
    await chat(p.url)
    assert forward_proxy.seen == [("CONNECT", url.removeprefix("https://").removesuffix("/v1"))]
    assert forward_proxy.auth == ["Basic " + base64.b64encode(b"alice:s3cret").decode()]
    assert "Proxy-Authorization" not in fake.seen[0].headers
