"""/metrics against what was stored, and the API under load while fetches run: no 5xx,
nothing lost. `mailingest run` and a real Dovecot, as in test_api_dovecot.py."""

from __future__ import annotations

import asyncio
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from api_support import ApiWorld, mail
from builders import dovecot_account
from daemon_support import WAIT
from dovecot import Dovecot
from mailingest.lease import lease_host
from mailingest.metrics import NAMES
from support import run_sql


def scrape(world: ApiWorld) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, labels) -> value."""
    response = world.get(None, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def stored_rows(config: Path) -> list[tuple[int, int]]:
    return [
        (int(i), int(n))
        for i, n in run_sql(config.parent / "mail.db", "SELECT id, size FROM messages")
    ]


def test_metrics_after_a_fetch_match_what_was_stored(tmp_path: Path, dovecot: Dovecot) -> None:
    world = ApiWorld(tmp_path, dovecot)
    wrong = dovecot.new_mailbox()
    with world.config.open("a") as config:  # a third account, whose password is wrong
        table = dovecot_account(wrong, "wrong-mail", owner="carol", password="not-it")
        config.write("\n[[accounts]]\n")
        config.writelines(f"{k} = {_toml(v)}\n" for k, v in table.items())
    world.make_tokens()  # creates the store
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _set_lease(world.config, "bob-mail", f"{lease_host()}:{dead.pid}:dead")
    world.alice.deliver_many([mail(n, "ann@cust.example") for n in range(5)])
    world.bob.deliver_many([mail(10 + n, "ben@other.example") for n in range(3)])
    with world.running():
        world.wait_stored(8)
        deadline = time.monotonic() + WAIT
        # A poll's figures count once it has ended (its record written, batched with
        # others': up to a quarter second after its mail is stored).
        while (metrics := scrape(world))[("mailingest_accounts_paused", ())] != 1 or metrics[
            ("mailingest_messages_stored_total", ())
        ] < len(stored_rows(world.config)):
            assert time.monotonic() < deadline, "no pause of the wrong password, or no figures"
            time.sleep(0.2)
    rows = stored_rows(world.config)
    assert len(rows) == 8
    assert metrics[("mailingest_messages_stored_total", ())] == 8
    assert metrics[("mailingest_bytes_stored_total", ())] == sum(size for _, size in rows)
    assert metrics[("mailingest_polls_total", (("result", "ok"),))] >= 2
    assert metrics[("mailingest_polls_total", (("result", "auth_failed"),))] == 1
    polls = sum(v for (name, _), v in metrics.items() if name == "mailingest_polls_total")
    assert metrics[("mailingest_poll_duration_seconds_count", ())] == polls
    assert metrics[("mailingest_accounts", ())] == 3
    assert metrics[("mailingest_lease_takeovers_total", ())] == 1
    assert metrics[("mailingest_store_commit_seconds_count", ())] >= 2
    assert metrics[("mailingest_api_requests_total", (("code", "200"),))] > 0
    families = {name for name, _ in metrics}
    for name in NAMES:  # every documented metric is exposed
        assert any(f == name or f.startswith(name + "_") for f in families), name


#: Requests in flight at once while the fetch runs (the issue's figure).
CONCURRENT = 1000


def test_many_concurrent_requests_while_fetches_run(tmp_path: Path, dovecot: Dovecot) -> None:
    # 1,000 connections at once: this (client) side needs the files; the daemon raises its own.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    world = ApiWorld(tmp_path, dovecot, poll="1s")
    world.import_records()
    world.make_tokens()
    padding = b"x" * 40_000 + b"\n"  # 40 MB in all: one fetch, committed 200 at a time
    total = 1000
    senders = ["ann@cust.example", "ben@other.example"]
    raws = [mail(n, random.choice(senders)) + padding for n in range(total)]
    with world.running() as daemon:
        statuses, during = asyncio.run(_load(world, raws))
        world.wait_stored(total)
        metrics = scrape(world)
        assert daemon.events("api_request_failed") == []
    assert not [s for s in statuses if s >= 500], sorted(set(statuses))
    assert set(statuses) <= {200, 401, 403, 404, 422}
    assert during, "the sampler never saw a fetch part way through"
    assert len(stored_rows(world.config)) == total
    assert metrics[("mailingest_messages_stored_total", ())] == total


async def _load(world: ApiWorld, raws: list[bytes]) -> tuple[list[int], int]:
    """Rounds of 1,000 concurrent requests (reads, share toggles, bad input), back to back,
    from before the mail arrives until all of it is stored; meanwhile a sampler counts the
    moments a fetch had stored part of it (it commits in batches of 200). The sampler is a
    thread: a task of this loop waits behind each round's thousand requests, and under
    load it once missed every moment in between (seen in a run on both cores)."""
    statuses: list[int] = []
    partial = 0
    failed: list[BaseException] = []
    done = threading.Event()

    def sample() -> None:
        nonlocal partial
        try:
            while not done.is_set():
                partial += 0 < _count(world.config) < len(raws)
                done.wait(0.02)
        except BaseException as exc:  # reported by the test, not lost with the thread
            failed.append(exc)

    sampler = threading.Thread(target=sample, name="sampler", daemon=True)
    sampler.start()
    try:
        delivered = asyncio.create_task(asyncio.to_thread(world.alice.deliver_many, raws))
        limits = httpx.Limits(max_connections=CONCURRENT)
        async with httpx.AsyncClient(base_url=world.url, timeout=WAIT, limits=limits) as client:
            deadline = time.monotonic() + 4 * WAIT
            while _count(world.config) < len(raws):
                assert time.monotonic() < deadline, "the mail was never all stored"
                listing = await _get(client, world, "alice", "/messages")
                ids = [m["id"] for m in listing.json()["messages"]]
                jobs = [_one(client, world, i, ids) for i in range(CONCURRENT)]
                statuses += [r.status_code for r in await asyncio.gather(*jobs)]
            await delivered
    finally:
        done.set()
        sampler.join()
    if failed:
        raise failed[0]
    return statuses, partial


def _count(config: Path) -> int:
    return int(run_sql(config.parent / "mail.db", "SELECT count(*) FROM messages")[0][0])


async def _get(
    client: httpx.AsyncClient, world: ApiWorld, who: str, path: str, **kw: Any
) -> httpx.Response:
    return await client.get(path, headers=world.headers(who), **kw)


async def _one(
    client: httpx.AsyncClient, world: ApiWorld, n: int, ids: list[int]
) -> httpx.Response:
    who = random.choice(["alice", "bob", "carol"])
    message = random.choice(ids) if ids else 1
    match n % 8:
        case 0:
            return await _get(client, world, who, "/messages", params={"limit": "20"})
        case 1:
            return await _get(client, world, who, f"/messages/{message}")
        case 2:
            return await _get(client, world, who, f"/messages/{message}/raw")
        case 3:
            method = random.choice(["PUT", "DELETE"])
            return await client.request(
                method, "/records/L1/shares/alice", headers=world.headers("alice")
            )
        case 4:
            return await client.put(
                "/records/L2", headers=world.headers("admin"), content=b"{broken"
            )
        case 5:
            return await client.get("/messages", headers={"Authorization": "Bearer wrong"})
        case 6:
            return await client.get("/metrics")
        case _:
            return await _get(client, world, who, "/messages", params={"record": "L1"})


def _set_lease(config: Path, account: str, holder: str) -> None:
    run_sql(
        config.parent / "mail.db",
        "INSERT INTO account_state (account, lease_holder, lease_expires) VALUES (?,?,?)",
        account,
        holder,
        time.time() + 60,
    )


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value) + '"'
