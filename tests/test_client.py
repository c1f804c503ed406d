"""The Python client against a real server: typed results and errors, and sessions that stay exactly once
through a connection dropped mid-step and a WebSocket dropped mid-stream."""

import asyncio
import contextlib
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from lstm_serve.client import (
    AsyncClient,
    Client,
    InvalidInput,
    ModelNotFound,
    SequenceConflict,
    SessionNotFound,
    Unauthorized,
)

MODEL = "japanese-vowels"


def test_models_and_classify_return_typed_results(server, test_sequences):
    with Client(server.url) as client:
        models = {m.name: m for m in client.models()}
        assert models[MODEL].input_dim == 12 and len(models[MODEL].feature_names) == 12
        example = client.model(MODEL).example
        predictions = client.classify([test_sequences[0], example["frames"]], model=MODEL)
        assert predictions[1].label == example["label"]
        assert predictions[0].probabilities.shape == (9,) and abs(predictions[0].probabilities.sum() - 1) < 1e-5
        with pytest.raises(InvalidInput):
            client.classify([np.zeros((3, 5))])
        with pytest.raises(ModelNotFound):
            client.model("nope")


def test_a_session_streams_exactly_and_is_deleted_on_exit(server, test_sequences):
    frames = test_sequences[4]
    with Client(server.url) as client:
        expected = client.classify([frames])[0]
        with client.session() as session:
            for start in range(0, len(frames), 3):
                last = session.step(frames[start : start + 3])
            assert session.steps == len(frames)
            np.testing.assert_allclose(last.probabilities, expected.probabilities, atol=1e-5)
            with pytest.raises(SequenceConflict) as conflict:
                client.request("POST", f"/v1/sessions/{session.id}/steps", {"inputs": frames[:1].tolist(), "seq": 0})
            assert conflict.value.expected_seq == len(frames)
            resumed = client.resume(session.state())
        with pytest.raises(SessionNotFound):
            client.request("GET", f"/v1/sessions/{session.id}")
        assert resumed.steps == len(frames)
        resumed.delete()


def test_a_stream_of_frames_of_another_width_is_refused_before_it_is_sent(server, test_sequences):
    """A binary message carries no width: [T, 24] frames to a 12-feature session were read as [2T, 12]."""
    frames = test_sequences[0]
    with Client(server.url) as client, client.session() as session:
        assert session.input_dim == 12
        with pytest.raises(ValueError, match="frames have 24 numbers each; the session's model takes 12"):
            next(session.stream([np.concatenate([frames[:2], frames[2:4]], axis=1)]))
        assert session.steps == 0 and client.request("GET", f"/v1/sessions/{session.id}")["steps"] == 0


class DropsOneReply(httpx.HTTPTransport):
    """Sends the n-th steps request to the server, then loses the answer, as a dropped connection would."""

    def __init__(self, drop_at: int) -> None:
        super().__init__()
        self.steps_seen, self.drop_at, self.dropped = 0, drop_at, False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith("/steps"):
            self.steps_seen += 1
            if self.steps_seen == self.drop_at:
                response.read()
                self.dropped = True
                raise httpx.ReadError("connection dropped after the server answered")
        return response


def test_a_step_whose_answer_was_lost_is_retried_exactly_once(server, test_sequences):
    frames = test_sequences[9]
    transport = DropsOneReply(drop_at=2)
    with Client(server.url, transport=transport) as client:
        expected = client.classify([frames])[0]
        with client.session() as session:
            for start in range(0, len(frames), 4):
                last = session.step(frames[start : start + 4])
    assert transport.dropped and transport.steps_seen == len(range(0, len(frames), 4)) + 1
    assert session.steps == len(frames), "the retried chunk was applied twice"
    np.testing.assert_allclose(last.probabilities, expected.probabilities, atol=1e-5)


class Proxy:
    """A TCP proxy that can lose the next answer the server sends (and drop the connection with it)."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.drop_next_reply = threading.Event()
        self.drops = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self.pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self.pipe, args=(upstream, client, True), daemon=True).start()

    def pipe(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_server and self.drop_next_reply.is_set():
                    self.drop_next_reply.clear()
                    self.drops += 1
                    break  # the server's answer is lost with the connection
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):  # shutdown first: a close() alone does not wake the other direction's recv
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self.listener.close()


def test_a_websocket_dropped_mid_stream_resumes_exactly(server, test_sequences):
    frames = test_sequences[12]
    chunks = [frames[i : i + 2] for i in range(0, len(frames), 2)]
    proxy = Proxy(server.port)
    try:
        with Client(f"http://127.0.0.1:{proxy.port}") as client:
            expected = client.classify([frames])[0]
            with client.session() as session:
                predictions = []
                for k, prediction in enumerate(session.stream(chunks)):
                    predictions.append(prediction)
                    if k in (1, 4):
                        proxy.drop_next_reply.set()  # the server applies the next chunk; its answer is lost
                assert proxy.drops == 2 and len(predictions) == len(chunks)
                assert session.steps == len(frames), "a resent chunk was applied twice"
                np.testing.assert_allclose(predictions[-1].probabilities, expected.probabilities, atol=1e-5)
    finally:
        proxy.close()


def test_the_client_sends_its_key(start_server, test_sequences):
    server = start_server(env={"LSTM_SERVE_API_KEYS": "client-key-1"})
    with pytest.raises(Unauthorized):
        Client(server.url).models()
    with Client(server.url, api_key="client-key-1") as client:
        with client.session() as session:
            (prediction,) = list(session.stream([test_sequences[0]]))
        assert prediction.label == client.classify([test_sequences[0]])[0].label


def test_the_async_client_classifies_steps_and_streams_exactly(server, test_sequences):
    frames = test_sequences[21]

    async def main():
        async with AsyncClient(server.url) as client:
            (expected,) = await client.classify([frames])
            async with await client.session() as session:
                for start in range(0, len(frames), 5):
                    stepped = await session.step(frames[start : start + 5])
            async with await client.session() as session:
                streamed = [p async for p in session.stream(frames[i : i + 3] for i in range(0, len(frames), 3))]
                steps = session.steps
            return expected, stepped, streamed[-1], steps

    expected, stepped, streamed, steps = asyncio.run(main())
    assert steps == len(frames)
    np.testing.assert_allclose(stepped.probabilities, expected.probabilities, atol=1e-5)
    np.testing.assert_allclose(streamed.probabilities, expected.probabilities, atol=1e-5)


def test_a_rate_limited_call_is_retried_after_retry_after(start_server, test_sequences):
    from lstm_serve.client import RateLimited

    server = start_server(env={"LSTM_SERVE_RATE_LIMIT": "5/s", "LSTM_SERVE_RATE_BURST": "1"})
    with Client(server.url) as client:
        with pytest.raises(RateLimited) as refused:
            for _ in range(3):
                client.request("POST", "/v1/classify", {"sequences": [test_sequences[0].tolist()]})
        assert refused.value.retry_after == 1.0, "the server's Retry-After reaches the exception"
        labels = {client.classify([test_sequences[0]])[0].label for _ in range(3)}  # each waits out a 429
    assert len(labels) == 1


def test_a_stream_resends_a_chunk_answered_429_and_raises_other_errors_with_their_status(start_server, test_sequences):
    """Over the WebSocket a 429 or a 503 is an error reply on an open socket: the chunk goes again with its
    seq, so it is applied exactly once; an error that a retry cannot mend is raised, with its HTTP status."""
    server = start_server(env={"LSTM_SERVE_RATE_LIMIT": "5/s", "LSTM_SERVE_RATE_BURST": "1"})
    frames = test_sequences[3]
    chunks = [frames[i : i + 2] for i in range(0, len(frames), 2)]
    with Client(server.url, retries=20) as client:
        with client.session() as session:  # first: a create is not retried (a second try could make two)
            expected = client.classify([frames])[0]
            predictions = list(session.stream(chunks))  # 5/s: most chunks are refused once or more first
            assert session.steps == len(frames), "a resent chunk was applied twice, or one was lost"
            np.testing.assert_allclose(predictions[-1].probabilities, expected.probabilities, atol=1e-5)
            with pytest.raises(InvalidInput) as refused:
                list(session.stream([np.full((1, 12), np.nan)]))
            assert refused.value.status == 422
        time.sleep(0.5)  # /metrics counts against the rate too
        metrics = httpx.get(f"{server.url}/metrics").text
    assert 'lstm_serve_rejected_requests_total{reason="rate_limited"}' in metrics


def test_the_client_knows_the_http_status_of_every_error_code_the_server_sends():
    """A WebSocket error reply carries only the code: the client's table of statuses must be the server's."""
    import lstm_serve.http.app  # noqa: F401 - every protocol's own errors are defined once the app is
    from lstm_serve import errors
    from lstm_serve.client import STATUS_OF_CODE

    def every(kind):
        for sub in kind.__subclasses__():
            yield sub
            yield from every(sub)

    kinds = [errors.ServiceError, *every(errors.ServiceError)]
    server = {kind.code: kind.status for kind in kinds if kind.__module__.startswith("lstm_serve.")}  # not tests
    assert server == STATUS_OF_CODE


def test_the_reconnect_budget_counts_drops_in_a_row_not_over_the_whole_stream(server, test_sequences):
    frames = test_sequences[7]
    chunks = [frames[i : i + 1] for i in range(10)]
    proxy = Proxy(server.port)
    try:
        with Client(f"HTTP://127.0.0.1:{proxy.port}") as client, client.session() as session:  # capitals too
            predictions = []
            for k, prediction in enumerate(session.stream(chunks, reconnects=1)):
                predictions.append(prediction)
                if k in (1, 3, 5, 7):
                    proxy.drop_next_reply.set()  # four drops in all, never two in a row
            assert proxy.drops == 4 and len(predictions) == len(chunks) and session.steps == len(chunks)
            expected = client.classify([frames[:10]])[0]
            np.testing.assert_allclose(predictions[-1].probabilities, expected.probabilities, atol=1e-5)
    finally:
        proxy.close()


def test_streaming_a_session_the_server_refuses_raises_at_once_instead_of_reconnecting(server):
    with Client(server.url) as client:
        session = client.session()
        session.delete()
        started = time.monotonic()
        with pytest.raises(SessionNotFound, match="never created, deleted, or expired"):
            list(session.stream([np.zeros((1, 12), np.float32)]))
        took = time.monotonic() - started

    async def in_async() -> float:
        async with AsyncClient(server.url) as client:
            session = await client.session()
            await session.delete()
            started = time.monotonic()
            with pytest.raises(SessionNotFound):
                async for _ in session.stream([np.zeros((1, 12), np.float32)]):
                    pass
            return time.monotonic() - started

    assert took < 0.5 and asyncio.run(in_async()) < 0.5, took
