"""A bounded soak against a real server with two API keys: hundreds of sessions streamed in random chunks,
with retries of the same chunk and seq, stale seqs, deletes, and the other key probing every session.
Every completed session equals the offline result, no key ever sees another's session, and the server's
memory stays bounded. About 30 s; set LSTM_SERVE_SOAK_SECONDS for longer."""

import asyncio
import os
import random
import time

import httpx
import numpy as np

from lstm_serve.core.repository import load_repository
from lstm_serve.core.runner import Item, OnnxRunner
from lstm_serve.settings import DEFAULT_REPOSITORY

MODEL = "japanese-vowels"
KEYS = ("soak-alice-5d1e", "soak-bob-77c2")
SOAK_S = float(os.environ.get("LSTM_SERVE_SOAK_SECONDS", "30"))
WORKERS = 16


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Soak:
    def __init__(self, url: str, sequences: list[np.ndarray], seed: int) -> None:
        self.url, self.sequences, self.random = url, sequences, random.Random(seed)
        self.offline = OnnxRunner(load_repository(DEFAULT_REPOSITORY)[MODEL], "cpu")
        self.completed = self.deleted = self.retries = self.stale = self.probes = 0
        self.problems: list[str] = []

    def expected(self, frames: np.ndarray) -> np.ndarray:
        return self.offline.run([Item(frames.astype(np.float32), None)])[0].probabilities[-1]

    async def one_session(self, clients: dict[str, httpx.AsyncClient]) -> None:
        rnd = self.random
        owner, other = rnd.sample(KEYS, 2)
        c = clients[owner]
        sequence = self.sequences[rnd.randrange(len(self.sequences))]
        created = await c.post("/v1/sessions", json={"model": MODEL})
        if created.status_code != 201:
            self.problems.append(f"create: {created.status_code} {created.text[:200]}")
            return
        session_id, seq = created.json()["session_id"], 0
        while seq < len(sequence):
            chunk = sequence[seq : seq + rnd.randint(1, 8)].tolist()
            if rnd.random() < 0.1:
                stale = await c.post(f"/v1/sessions/{session_id}/steps", json={"inputs": chunk, "seq": seq + 3})
                self.stale += 1
                if stale.status_code != 409 or stale.json()["error"]["expected_seq"] != seq:
                    self.problems.append(f"stale seq: {stale.status_code} {stale.text[:200]}")
            if rnd.random() < 0.1:
                probe = await clients[other].get(f"/v1/sessions/{session_id}")
                steal = await clients[other].post(f"/v1/sessions/{session_id}/steps", json={"inputs": chunk})
                self.probes += 1
                if probe.status_code != 404 or steal.status_code != 404:
                    self.problems.append(f"cross-key: {probe.status_code} {steal.status_code}")
            body = {"inputs": chunk, "seq": seq}
            reply = await c.post(f"/v1/sessions/{session_id}/steps", json=body)
            if rnd.random() < 0.15:
                again = await c.post(f"/v1/sessions/{session_id}/steps", json=body)
                self.retries += 1
                if again.json() != reply.json():
                    self.problems.append(f"retry differs: {reply.text[:120]} vs {again.text[:120]}")
            if reply.status_code != 200:
                self.problems.append(f"step: {reply.status_code} {reply.text[:200]}")
                return
            seq = reply.json()["steps"]
            if rnd.random() < 0.02:
                deleted = await c.delete(f"/v1/sessions/{session_id}")
                after = await c.get(f"/v1/sessions/{session_id}")
                self.deleted += 1
                if deleted.status_code != 204 or after.status_code != 404:
                    self.problems.append(f"delete: {deleted.status_code} then {after.status_code}")
                return
        got = np.array(reply.json()["prediction"]["probabilities"])
        if not np.allclose(got, self.expected(sequence), atol=1e-5):
            self.problems.append(
                f"session {session_id}: off the offline result by {abs(got - self.expected(sequence)).max()}"
            )
        self.completed += 1
        await c.delete(f"/v1/sessions/{session_id}")

    async def run(self, seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        clients = {
            key: httpx.AsyncClient(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {key}"})
            for key in KEYS
        }

        async def worker() -> None:
            while time.perf_counter() < deadline and len(self.problems) < 20:
                await self.one_session(clients)

        try:
            await asyncio.gather(*(worker() for _ in range(WORKERS)))
        finally:
            for client in clients.values():
                await client.aclose()


def test_soak_sessions_stay_exact_private_and_bounded(start_server, test_sequences):
    server = start_server(env={"LSTM_SERVE_API_KEYS": ",".join(KEYS)})
    soak = Soak(server.url, test_sequences, seed=2026)
    asyncio.run(soak.run(min(10.0, SOAK_S / 6)))  # warm: allocator pools and caches reach their working size
    warm_rss = rss_bytes(server.proc.pid)
    asyncio.run(soak.run(SOAK_S - min(10.0, SOAK_S / 6)))
    grown = rss_bytes(server.proc.pid) - warm_rss
    print(
        f"soak: {soak.completed} sessions completed exactly, {soak.deleted} deleted, {soak.retries} retries, "
        f"{soak.stale} stale seqs, {soak.probes} cross-key probes; RSS grew {grown / 2**20:.1f} MiB after warm-up"
    )
    assert not soak.problems, soak.problems[:10]
    assert soak.completed >= 100, f"only {soak.completed} sessions completed"
    assert grown < 64 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB"
    assert server.proc.poll() is None
