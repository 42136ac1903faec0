"""What an operator hits when a deployment restarts (issue 19): a resumed server keeps its tokens, and a
restarted client process either carries its optimizer state (``--state-dir``: exact) or says it is not exact."""

import json

import pytest
import yaml
from test_deploy import (
    PROC_TIMEOUT,
    TOKENS,
    _adapters_equal,
    _env,
    _server,
    _setup,
    _sim,
    procs,  # noqa: F401 - the fixture
)

from splitcom.errors import UserError


def test_resumed_server_keeps_the_tokens_it_was_started_with(tmp_path):
    """Started with --tokens FILE, resumed without it: the tokens of FILE, nothing minted; FILE gone: exit 2
    saying to pass --tokens again. Started without --tokens: the generated OUT/tokens.yaml again."""
    from splitcom.deploy.cli import _tokens

    given = tmp_path / "mine.yaml"
    given.write_text(yaml.safe_dump(TOKENS))
    out = tmp_path / "run"
    out.mkdir()
    (out / "server.json").write_text(json.dumps({"tokens_file": str(given)}))
    assert _tokens(None, out, 3, resume=True) == TOKENS
    assert not (out / "tokens.yaml").exists()  # nothing minted
    given.unlink()
    with pytest.raises(UserError, match="pass --tokens again") as err:
        _tokens(None, out, 3, resume=True)
    assert err.value.exit_code == 2
    fresh = tmp_path / "gen"
    minted = _tokens(None, fresh, 3)
    (fresh / "server.json").write_text(json.dumps({"tokens_file": str(fresh / "tokens.yaml")}))
    assert _tokens(None, fresh, 3, resume=True) == minted
    with pytest.raises(UserError, match="pass --tokens"):
        _tokens(None, tmp_path / "empty", 3, resume=True)  # no record and no tokens.yaml: never mint


def test_resumed_server_started_with_tokens_serves_its_clients(procs, tmp_path):  # noqa: F811
    """The README's way: `server --tokens F`, killed, `server --resume OUT` (no --tokens): the clients'
    tokens still open the door and the run ends."""
    _setup(tmp_path)
    out = tmp_path / "deploy"
    server, address = _server(procs, out, env=_env(SERVER_EXIT_AFTER_TURNS=4))
    clients = [procs.start(f"c{cid}", ["client", "--server", address, "--client-id", str(cid), "--token",
                                       TOKENS[cid], "--reconnect-timeout", str(PROC_TIMEOUT)], _env())
               for cid in range(3)]  # they survive the server
    assert procs.wait(server) == 17, procs.log("server0")
    p = procs.start("server4", ["server", "--bind", address, "--resume", str(out)], _env())
    assert procs.wait(p) == 0, procs.log("server4")
    assert "generated a token" not in procs.log("server4")
    assert [procs.wait(c) for c in clients] == [0, 0, 0], procs.log("c0")


@pytest.mark.parametrize("keep_state", [True, False])
def test_restarted_client_processes(procs, tmp_path, keep_state):  # noqa: F811
    """The server dies in round 2, the client processes are killed too; a resumed server and new client
    processes finish the run. With --state-dir the clients reload their round-start AdamW state and the run
    ends bit-identical to `splitcom run`; without it each new client warns that it starts from an empty
    optimizer state, and the adapters indeed differ."""
    tree = _setup(tmp_path)
    out = tmp_path / "deploy"
    state = ["--state-dir", str(tmp_path / "state")] if keep_state else []

    def client(name, cid, address):
        return procs.start(name, ["client", "--server", address, "--client-id", str(cid), "--token", TOKENS[cid],
                                  "--reconnect-timeout", str(PROC_TIMEOUT), *state], _env())

    server, address = _server(procs, out, env=_env(SERVER_EXIT_AFTER_TURNS=7))
    first = [client(f"a{cid}", cid, address) for cid in range(3)]
    assert procs.wait(server) == 17, procs.log("server0")
    for c in first:
        c.kill()
        c.wait(10)
    resumed, _ = _server(procs, out, "--resume", str(out), bind=address)
    second = [client(f"b{cid}", cid, address) for cid in range(3)]
    sim = _sim(tree, tmp_path / "sim")
    assert procs.wait(resumed) == 0, procs.log("server3")
    assert [procs.wait(c) for c in second] == [0, 0, 0]
    warned = ["empty optimizer state" in procs.log(f"b{cid}") for cid in range(3)]
    if keep_state:
        assert _adapters_equal(out, tmp_path / "sim") and warned == [False] * 3
        dep = json.loads((out / "summary.json").read_text())
        assert dep["val_loss_by_epoch"] == sim["val_loss_by_epoch"]
    else:
        assert warned == [True] * 3 and not _adapters_equal(out, tmp_path / "sim")
