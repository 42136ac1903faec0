"""Deployment over gRPC loopback with tiny-llama: `splitcom server` and `splitcom client` processes.

Every process and wait is bounded (PROC_TIMEOUT); a fixture kills whatever is still running."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from splitcom.config import build_config
from splitcom.deploy.client import ClientDriver, ClientOptions
from splitcom.deploy.plan import round_plan
from splitcom.deploy.server import ServerDriver
from splitcom.federation.simulation import run as run_sim
from splitcom.runlog import read_metrics

TOKENS = {0: "token-zero-0000", 1: "token-one-11111", 2: "token-two-22222"}
PROC_TIMEOUT = 150  # s, per process: generous for 2 shared cores, small enough never to hang CI
BASE = {"model": {"name": "tiny-llama"}, "split": {"cut_layer": 2},
        "data": {"dataset": "synthetic", "max_train_samples": 48, "max_eval_samples": 16, "max_length": 48},
        "federation": {"num_clients": 3, "aggregate_every": 1},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.003}, "logging": {"progress": False}}
VOLATILE = {"wall_s", "simulated_s", "cuts", "clients", "dropped", "adapter_bytes"}  # timing, and fields one side only has


def _env(**faults):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    env.update({f"SPLITCOM_FAULT_{k}": str(v) for k, v in faults.items()})
    return env


class Procs:
    """Processes of one test, with their logs; all killed at teardown."""

    def __init__(self, tmp):
        self.tmp, self.procs = tmp, []

    def start(self, name, args, env):
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed at teardown
        p = subprocess.Popen([sys.executable, "-m", "splitcom.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                             env=env, cwd=self.tmp)
        self.procs.append((name, p, log))
        return p

    def log(self, name):
        return (self.tmp / f"{name}.log").read_text()

    def wait(self, p, timeout=PROC_TIMEOUT):
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"process {p.args} did not finish within {timeout} s:\n" +
                        "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n, _, _ in self.procs))

    def close(self):
        for _, p, log in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
            log.close()


@pytest.fixture
def procs(tmp_path):
    ps = Procs(tmp_path)
    yield ps
    ps.close()


def _setup(tmp, **federation):
    tree = json.loads(json.dumps(BASE))
    tree["federation"].update(federation)
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(tree))
    (tmp / "tokens.yaml").write_text(yaml.safe_dump(TOKENS))
    return tree


def _server(procs, out, *extra, env=None, bind="127.0.0.1:0", wait_for=None):
    args = ["server", "--bind", bind, "--tokens", "tokens.yaml", *extra]
    if "--resume" not in extra:
        args += ["-c", "cfg.yaml", "--out", str(out)]
    p = procs.start(f"server{len(procs.procs)}", args, env or _env())
    endpoint, deadline = out / "server.json", time.monotonic() + PROC_TIMEOUT
    while not (endpoint.is_file() and json.loads(endpoint.read_text())["pid"] == p.pid):
        assert p.poll() is None, procs.log(procs.procs[-1][0])
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)
    return p, json.loads(endpoint.read_text())["address"]


def _client(procs, address, cid, env=None):
    return procs.start(f"client{cid}_{len(procs.procs)}", ["client", "--server", address, "--client-id", str(cid),
                                                           "--token", TOKENS[cid], "--reconnect-timeout",
                                                           str(PROC_TIMEOUT)], env or _env())


class Thread:
    """A client (or server) driver running in this process; ``result`` or ``error`` once done."""

    def __init__(self, fn):
        self.result, self.error = None, None
        self.t = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.t.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as err:  # noqa: BLE001 - reported by join()
            self.error = err

    def join(self, timeout=PROC_TIMEOUT):
        self.t.join(timeout)
        assert not self.t.is_alive(), "driver thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def _thread_client(address, cid):
    return Thread(ClientDriver(ClientOptions(address, cid, TOKENS[cid], reconnect_s=PROC_TIMEOUT)).run)


def _inproc_server(tree, out):
    driver = ServerDriver(build_config(tree), out)
    port = driver.listen("127.0.0.1:0", TOKENS)
    thread = Thread(driver.serve)
    thread.driver = driver
    return f"127.0.0.1:{port}", thread


def server_driver(thread):
    return thread.driver


def _sim(tree, out):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes run; results agree with 2 threads too, but this is quicker
    try:
        return run_sim(build_config(tree), out, progress=False)
    finally:
        torch.set_num_threads(threads)


def _adapters_equal(a, b):
    x, y = load_file(str(a / "adapter" / "adapter_model.safetensors")), load_file(str(b / "adapter" /
                                                                                    "adapter_model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _events(path):
    return [{k: v for k, v in e.items() if k not in VOLATILE} for e in read_metrics(path)]


def test_three_client_processes_match_simulation(procs, tmp_path):
    """round_robin over gRPC ends with bit-identical adapters, the same metrics.jsonl (but timings) and
    the same byte counts as `splitcom run`; the envelopes' bytes equal what gRPC itself serialized."""
    tree = _setup(tmp_path)
    out = tmp_path / "deploy"
    server, address = _server(procs, out)
    clients = [_client(procs, address, cid) for cid in range(3)]
    sim = _sim(tree, tmp_path / "sim")
    assert procs.wait(server) == 0, procs.log("server0")
    assert [procs.wait(c) for c in clients] == [0, 0, 0]
    dep = json.loads((out / "summary.json").read_text())
    assert _adapters_equal(out, tmp_path / "sim")
    assert _events(out / "metrics.jsonl") == _events(tmp_path / "sim" / "metrics.jsonl")
    for key in ("bytes_up", "bytes_down", "bytes_by_stream", "train_tokens", "val_loss_by_epoch",
                "train_loss_by_epoch", "initial_val_loss", "rounds", "client_samples", "reuse_ratio"):
        assert dep[key] == sim[key], key
    # transfers_by_stream sums every sender's counters, which in deployment live in the client processes
    assert set(sim) - set(dep) <= {"simulated_s", "simulated_s_by_epoch", "makespan_per_step_s", "devices",
                                   "cuts_by_round", "transfers_by_stream"}
    assert dep["wire_bytes_up"] == dep["grpc_message_bytes"]["up"]
    assert dep["wire_bytes_down"] == dep["grpc_message_bytes"]["down"]
    payload = dep["bytes_up"] + dep["bytes_down"]
    assert 0 < dep["envelope_bytes"] < 0.01 * payload  # a few bytes per message
    assert dep["dropped"] == [] and dep["transport"] == "grpc"
    for cid in range(3):  # every client says goodbye with its byte count
        assert f"client {cid} done: 4 steps (0 rejected)" in procs.log(f"client{cid}_{cid + 1}")


def test_dead_and_hung_clients_are_dropped_and_rejoin(procs, tmp_path):
    """Client 1's process dies after its first step of round 1: dropped at once (its connection closes),
    the round aggregates the other two, a new client-1 process rejoins. Client 2 is frozen (SIGSTOP):
    dropped after client_timeout_s; thawed, it learns it was dropped and rejoins by itself."""
    tree = _setup(tmp_path, client_timeout_s=3, min_clients=1, aggregate_every="epoch")
    tree["train"]["epochs"] = 10  # 10 rounds of two steps each
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tree))
    out = tmp_path / "deploy"
    address, server = _inproc_server(tree, out)  # server and client 0 in this process: fewer imports
    c0 = _thread_client(address, 0)
    c1 = _client(procs, address, 1, _env(CLIENT_EXIT_AFTER_STEPS=3))
    c2 = _client(procs, address, 2)
    # The replacement for client 1 prepares now (in this process), and joins once the first one died.
    spare = ClientDriver(ClientOptions(address, 1, TOKENS[1], reconnect_s=PROC_TIMEOUT))
    spare.connect()
    assert procs.wait(c1) == 17  # the fault injection's exit code
    spare_run = Thread(spare.run)
    deadline = time.monotonic() + 60
    while server_driver(server).next_round < 4:  # freeze client 2 in round 3 or later
        assert time.monotonic() < deadline and server.t.is_alive(), "the run does not progress"
        time.sleep(0.02)
    c2.send_signal(signal.SIGSTOP)
    try:
        while not any(d["client"] == 2 for d in list(server_driver(server).drops)):
            assert time.monotonic() < deadline and server.t.is_alive(), "client 2 was not dropped"
            time.sleep(0.05)
    finally:
        c2.send_signal(signal.SIGCONT)
    summary = server.join()
    assert spare_run.join()["client"] == 1 and c0.join()["rejected_steps"] == 0
    assert procs.wait(c2) == 0
    assert summary == json.loads((out / "summary.json").read_text())
    drops = {d["client"]: (d["round"], d["reason"]) for d in summary["dropped"]}
    assert drops[1] == (1, "its connection closed"), drops
    r2, reason = drops[2]
    assert "within client_timeout_s = 3 s" in reason, reason
    rounds = [e for e in read_metrics(out / "metrics.jsonl") if e["event"] == "round"]
    assert len(rounds) == 10 and rounds[1]["clients"] == [0, 2] and rounds[1]["dropped"] == [1]
    assert r2 >= 3 and 2 in rounds[r2]["dropped"] and 2 not in rounds[r2]["clients"] and 0 in rounds[r2]["clients"]
    assert any(1 in r["clients"] for r in rounds[2:])  # the new client-1 process took part
    assert any(2 in r["clients"] for r in rounds[r2 + 1:])  # client 2 rejoined after thawing
    assert "joining again" in procs.log("client2_1")
    assert summary["val_loss"] < summary["initial_val_loss"]


def _crash_and_resume(procs, tmp_path, tree, **fault):
    """The server dies in round 2 of 4 (``fault``), three client threads survive it, `splitcom server --resume`
    finishes the run: (out, deployed summary, simulation summary), the adapters already checked equal."""
    out = tmp_path / "deploy"
    server, address = _server(procs, out, env=_env(**fault))
    clients = [_thread_client(address, cid) for cid in range(3)]  # they survive the server: threads here
    assert procs.wait(server) == 17, procs.log("server0")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["next_round"] == 2  # rounds 0, 1 checkpointed
    resumed, _ = _server(procs, out, "--resume", str(out), bind=address)
    sim = _sim(tree, tmp_path / "sim")
    assert procs.wait(resumed) == 0, procs.log("server1")
    assert [c.join()["rejoins"] for c in clients] == [1, 1, 1]
    assert _adapters_equal(out, tmp_path / "sim")
    dep = json.loads((out / "summary.json").read_text())
    assert dep["resumed_at_rounds"] == [2]
    return out, dep, sim


def test_server_resume_equals_uninterrupted_run(procs, tmp_path):
    """The server dies mid-round (after 7 of 12 step turns: round 2 of 4); `splitcom server --resume OUT`
    on the same port continues from round 1's checkpoint; the three surviving clients replay round 2
    from the last global adapter and their round-start optimizer state. The final adapters and
    metrics equal an uninterrupted simulation's."""
    out, dep, sim = _crash_and_resume(procs, tmp_path, _setup(tmp_path), SERVER_EXIT_AFTER_TURNS=7)
    assert dep["val_loss_by_epoch"] == sim["val_loss_by_epoch"]
    assert dep["train_loss_by_epoch"] == sim["train_loss_by_epoch"]
    for stream in ("act_up", "grad_down", "adapters_up"):  # what the dead server got of round 2 is not counted
        assert dep["bytes_by_stream"][stream] == sim["bytes_by_stream"][stream], stream
    # on rejoining, each client downloaded the global adapter once more (12 downloads -> 15), and resent labels
    assert dep["bytes_by_stream"]["adapters_down"] * 12 == sim["bytes_by_stream"]["adapters_down"] * 15
    assert dep["bytes_by_stream"]["labels_up"] > sim["bytes_by_stream"]["labels_up"]
    # metrics.jsonl lost what the dead server logged of round 2 and has the replay instead
    losses = [(e["client"], e["loss"]) for e in read_metrics(out / "metrics.jsonl") if e["event"] == "step"]
    assert losses == [(e["client"], e["loss"]) for e in read_metrics(tmp_path / "sim" / "metrics.jsonl")
                      if e["event"] == "step"]


def test_fl_server_resume_equals_uninterrupted_run(procs, tmp_path):
    """Federated LoRA: the server dies after 7 of 12 uploads (in round 2 of 4, no step turns in fl); resumed
    from round 1's checkpoint, the surviving clients train round 2 again from its start (the global adapter,
    their round-start optimizer state) and the run ends as `splitcom run` ends."""
    out, dep, sim = _crash_and_resume(procs, tmp_path, _setup(tmp_path, mode="fl"), SERVER_EXIT_AFTER_UPLOADS=7)
    for key in ("val_loss_by_epoch", "train_loss_by_epoch", "train_tokens"):
        assert dep[key] == sim[key], key
    assert dep["bytes_by_stream"]["adapters_up"] == sim["bytes_by_stream"]["adapters_up"]
    # on rejoining, each client downloaded the global adapter once more (12 downloads -> 15)
    assert dep["bytes_by_stream"]["adapters_down"] * 12 == sim["bytes_by_stream"]["adapters_down"] * 15


@pytest.mark.parametrize("over,exact", [
    ({"compression.temporal.enabled": True, "train.epochs": 3, "compression.temporal.controller": "bangbang",
      "compression.temporal.bangbang.aggressive": 0.3, "compression.temporal.bangbang.conservative": 1.0,
      "compression.temporal.bangbang.budget": 0.5}, "reuse"),
    ({"federation.schedule": "longest_tail_first", "federation.server_adapters": "shared"}, None),
    ({"split.mode": "ushape", "split.tail_layers": 1, "compression.temporal.enabled": True,
      "compression.temporal.threshold": 0.3, "compression.codec": "int8", "compression.grad_codec": "int8",
      "compression.temporal.streams": ["act_up", "act_down", "grad_up", "grad_down"],
      "model.lora.cut_rank": 2, "compression.adapter_codec": "int8"}, "ushape"),
    ({"split.mode": "ushape", "split.tail_layers": 1, "compression.temporal.enabled": True,
      "compression.temporal.streams": ["act_up", "act_down"], "compression.temporal.reused_grad": "skip",
      "compression.temporal.threshold": {"act_up": -1.0, "act_down": 0.99999}, "federation.server_adapters": "shared",
      "train.epochs": 3, "train.server_epochs": 1, "train.lr_schedule": "linear"}, "ushape"),
    ({"split.mode": "ushape", "split.tail_layers": 1, "compression.temporal.enabled": True,
      "compression.temporal.streams": ["act_up", "act_down"], "compression.temporal.reused_grad": "skip",
      "compression.temporal.skip_from_epoch": 3, "compression.temporal.threshold": {"act_up": -1.0, "act_down": 0.99999},
      "federation.server_adapters": "shared", "train.epochs": 3, "train.server_epochs": 1,
      "train.lr_schedule": "linear", "logging.keep_epochs": [1, 2]}, "ushape"),
    ({"split.cut_policy": "adaptive", "model.lora.cut_rank": 2, "compression.adapter_refresh": "delta"}, "adaptive"),
    ({"federation.mode": "fl"}, "fl"),
    ({"federation.mode": "fl", "compression.adapter_refresh": "delta", "compression.adapter_codec": "int8",
      "compression.entropy": "zstd", "federation.aggregate_every": "epoch", "train.lr_schedule": "cosine"}, "fl"),
    ({"compression.temporal.enabled": True, "train.epochs": 3, "compression.temporal.refresh": "delta",
      "compression.temporal.threshold": {"act_up": 0.999}, "compression.prefix": True, "compression.entropy": "zstd",
      "compression.codec": "int8", "compression.adapter_refresh": "delta", "compression.adapter_codec": "int8",
      "train.lr_schedule": "linear", "train.warmup_steps": 2}, "delta"),
    ({"compression.temporal.enabled": True, "train.epochs": 3, "compression.temporal.refresh": "delta",
      "compression.temporal.threshold": {"act_up": 0.999}, "compression.prefix": True, "compression.entropy": "zstd",
      "compression.codec": "int4o", "compression.temporal.delta_codec": "sign1o", "compression.prefix_refresh": True,
      "federation.server_adapters": "shared", "train.lr_schedule": "linear"}, "prefix-refresh"),
])
def test_in_process_deployment(tmp_path, over, exact):
    """Server and clients as threads of this process, over gRPC loopback. With temporal reuse and a
    threshold controller (the server sends each round's threshold down) and bang-bang's byte budget (each
    client's sender switches levels sample by sample) round_robin still matches simulation exactly; so does U-shape with reuse on all four streams, int8 and a cut rank (two
    exchanges per step, the client keeps its turn between), and adaptive cuts that move between rounds;
    a dynamic schedule trains too (its order depends on timing); so does residual refresh with shared
    prompt prefixes and zstd, under a warmed-up linear learning-rate decay (every end sets the rate of the
    message's global step), and 1-bit refreshes that share prompt prefixes too (``prefix_refresh``, the
    `shared+lean+linear` row: kind-5 messages with error feedback on both ends), and a U-shape server frozen
    after its first epoch (train.server_epochs) whose clients send SKIP gradients for reused activations (from
    the start, or from epoch 3 where skip_from_epoch says so: epoch 2's gradients all go both ways). Federated LoRA (fl)
    deploys too: each client trains the whole model between its uploads (under a cosine decay in one
    case), the server sends no activations, and the run ends as `splitcom run` ends."""
    tree = _setup(tmp_path)
    for key, value in over.items():
        node = tree
        *path, leaf = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    address, server = _inproc_server(tree, tmp_path / "deploy")
    clients = [_thread_client(address, cid) for cid in range(3)]
    dep = server.join()
    assert [c.join()["rejected_steps"] for c in clients] == [0, 0, 0]
    sim = _sim(tree, tmp_path / "sim")
    assert dep["bytes_by_stream"] == sim["bytes_by_stream"]
    if "logging.keep_epochs" in over:  # the server keeps the checkpoints of the rounds that end epochs 1 and 2
        kept = [torch.load(tmp_path / "deploy" / "checkpoints" / f"epoch-{e}.pt", weights_only=True)["next_round"]
                for e in (1, 2)]
        assert 0 < kept[0] < kept[1] < torch.load(tmp_path / "deploy" / "checkpoint.pt", weights_only=True)["next_round"]
        assert sorted(p.name for p in (tmp_path / "sim" / "checkpoints").iterdir()) == ["epoch-1.pt", "epoch-2.pt"]
    if exact == "reuse":
        assert sim["reuse_ratio"] > 0.3 and dep["reuse_ratio"] == sim["reuse_ratio"]
        assert dep["threshold_by_epoch"] == sim["threshold_by_epoch"] == [0.3, 0.3, 0.3]
        # the byte budget (0.5 of FULL): each client sends every other repeat sighting FULL, sample by sample
        assert dep["reuse_ratio_by_epoch"] == sim["reuse_ratio_by_epoch"] == [0.0, 0.5, 0.5]
    if exact == "ushape":
        assert "labels_up" not in dep["bytes_by_stream"] and dep["bytes_by_stream"]["grad_up"] > 0
        assert sim["reuse_ratio_by_stream"]["act_down"] > 0
    if exact == "delta":  # residual refresh, shared prompt prefixes and zstd on every stream
        assert sim["transfers_by_stream"]["act_up"]["delta"] > 0
        assert sim["transfers_by_stream"]["act_up"]["prefix_rows_shared"] > 0
    if exact == "prefix-refresh":  # the refreshes took prompt rows by key: fewer bytes than without the knob
        assert sim["transfers_by_stream"]["act_up"]["delta"] > 0
        assert dep["transfers_by_stream"]["act_up"] == sim["transfers_by_stream"]["act_up"]
        tree["compression"]["prefix_refresh"] = False
        plain = _sim(tree, tmp_path / "sim-plain")["transfers_by_stream"]["act_up"]
        assert plain["delta"] == sim["transfers_by_stream"]["act_up"]["delta"]
        assert plain["prefix_rows_shared"] < sim["transfers_by_stream"]["act_up"]["prefix_rows_shared"]
        assert plain["delta_bytes"] > sim["transfers_by_stream"]["act_up"]["delta_bytes"]
    if exact == "fl":  # federated LoRA: the clients train alone, adapters alone travel; same log and summary
        assert set(dep["bytes_by_stream"]) == {"adapters_up", "adapters_down", "control"}
        assert _events(tmp_path / "deploy" / "metrics.jsonl") == _events(tmp_path / "sim" / "metrics.jsonl")
        for key in ("train_loss_by_epoch", "val_loss_by_epoch", "train_tokens", "rounds", "client_memory_estimate_bytes"):
            assert dep[key] == sim[key], key
        assert set(sim) - set(dep) == {"simulated_s", "simulated_s_by_epoch", "makespan_per_step_s", "devices"}
    if exact == "adaptive":  # the server moves cuts by the same rule; clients follow from their downloads
        assert dep["cuts_by_round"] == sim["cuts_by_round"]
        assert len({tuple(c) for c in sim["cuts_by_round"]}) > 1
    if exact:
        assert _adapters_equal(tmp_path / "deploy", tmp_path / "sim")
    else:
        assert dep["val_loss"] < dep["initial_val_loss"] and dep["schedule"] == "longest_tail_first"


def test_deployment_summary_has_simulations_keys_and_transfers(tmp_path):
    """A deployed run writes what `splitcom run` writes but the simulated clock; the senders' counters
    (transfers_by_stream: the clients report theirs with each upload) and reuse ratios by stream equal
    simulation's, in U-shape with reuse, residual refreshes and shared prefixes on the streams."""
    tree = _setup(tmp_path)
    tree["split"].update({"mode": "ushape", "cut_layer": 1, "tail_layers": 1})
    tree["train"]["epochs"] = 3
    tree["compression"] = {"codec": "int8", "grad_codec": "int8", "prefix": True, "entropy": "zstd",
                           "temporal": {"enabled": True, "refresh": "delta",
                                        "threshold": {"act_up": 0.99, "act_down": 0.3, "grad_up": 0.99, "grad_down": 0.3},
                                        "streams": ["act_up", "act_down", "grad_up", "grad_down"]}}
    address, server = _inproc_server(tree, tmp_path / "deploy")
    clients = [_thread_client(address, cid) for cid in range(3)]
    dep = server.join()
    assert [c.join()["rejected_steps"] for c in clients] == [0, 0, 0]
    sim = _sim(tree, tmp_path / "sim")
    assert set(sim) - set(dep) == {"simulated_s", "simulated_s_by_epoch", "makespan_per_step_s", "devices"}
    assert dep["transfers_by_stream"] == sim["transfers_by_stream"]
    assert set(sim["transfers_by_stream"]) == {"act_up", "act_down", "grad_up", "grad_down"}
    assert all(t["reuse"] > 0 for t in sim["transfers_by_stream"].values())
    assert sim["transfers_by_stream"]["act_up"]["delta"] > 0 and sim["transfers_by_stream"]["grad_up"]["delta"] > 0
    assert sim["transfers_by_stream"]["act_up"]["prefix_rows_shared"] > 0
    assert dep["reuse_ratio_by_stream"] == sim["reuse_ratio_by_stream"]
    assert dep["bytes_by_stream"] == sim["bytes_by_stream"] and _adapters_equal(tmp_path / "deploy", tmp_path / "sim")


def test_round_plan_is_simulations_aggregation_points():
    """Every `every` step indices, restarting each epoch, and at each epoch end (simulation.run)."""
    plan = round_plan(2, 5, 2)
    assert [(r.epoch, r.first_step, r.end_step, r.global_step0, r.ends_epoch) for r in plan] == [
        (1, 0, 2, 0, False), (1, 2, 4, 2, False), (1, 4, 5, 4, True),
        (2, 0, 2, 5, False), (2, 2, 4, 7, False), (2, 4, 5, 9, True)]
    assert [r.index for r in plan] == list(range(6)) and plan[4].global_step(3) == 8
    assert [(r.first_step, r.end_step, r.global_step0) for r in round_plan(2, 3, "epoch")] == [(0, 3, 0), (0, 3, 3)]
    assert len(round_plan(1, 4, 2)) == 2 and round_plan(1, 4, 2)[-1].ends_epoch


def test_server_generates_tokens_readable_by_owner_only(tmp_path):
    from splitcom.deploy.cli import _tokens

    tokens = _tokens(None, tmp_path, 3)
    assert sorted(tokens) == [0, 1, 2] and len(set(tokens.values())) == 3
    assert (tmp_path / "tokens.yaml").stat().st_mode & 0o777 == 0o600
    assert _tokens(None, tmp_path, 3) == tokens  # a resumed run finds them again
