"""gRPC loopback against the in-process transport: step time of the same run, side by side, and raw
activation throughput against a memory copy. These machines are noisy, so both sides run interleaved
in one process and medians are reported.

    .venv/bin/python bench/transport.py [--models tiny-llama smollm2-135m] [--steps 8] [--repeats 40]

Step time, one client, same config, model and batches on both sides:
  A (simulation)  SplitClient -> InProcessChannel -> SplitServer
  B (deployment)  SplitClient -> GrpcChannel -> 127.0.0.1 -> SplitComService -> ServerDriver (turn gate,
                  counters) -> SplitServer, the server side in threads of this process
Prints the median seconds per step of each and B / A (goal <= 1.15), and checks that both sides computed
the same losses. Run with OMP_NUM_THREADS=1 on a shared machine (torch's thread pool thrashes otherwise).
Throughput: act_up messages of one full batch (fp32, batch_size x max_length x hidden) over the step
stream to a server that only acknowledges them, one round trip each as in a step, against copying the
same bytes in memory (bytearray). Prints MB/s of each and their ratio, and the envelope bytes per message.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
import warnings

import torch

from splitcom.compress.codecs import get_codec
from splitcom.config import build_config
from splitcom.deploy.client import ClientDriver, ClientOptions
from splitcom.deploy.server import ServerDriver
from splitcom.federation.setup import prepare
from splitcom.federation.simulation import build_sfl
from splitcom.protocol import serde
from splitcom.protocol.messages import SampleTensor, Stream, TensorMsg
from splitcom.transport.counters import ByteCounter
from splitcom.transport.grpc_client import GrpcClient
from splitcom.transport.grpc_server import SplitComService, start_server
from splitcom.transport.security import TokenAuth

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
TOKEN = {0: "bench-token-0000"}


def step_times(model: str, steps: int, cut: int, batch_size: int, max_length: int) -> dict:
    cfg = build_config({}, [f"model.name={model}", f"split.cut_layer={cut}", "federation.num_clients=1",
                            f"train.batch_size={batch_size}", f"data.max_length={max_length}",
                            f"data.max_train_samples={batch_size * (steps + 1)}", "data.max_eval_samples=1",
                            "train.epochs=1", "logging.progress=false"])
    sim = prepare(cfg)  # A
    _, (a,) = build_sfl(sim, ByteCounter())
    a.join()
    driver = ServerDriver(cfg, tempfile.mkdtemp(prefix="splitcom-bench-"))  # B: the deployment stack
    address = f"127.0.0.1:{driver.listen('127.0.0.1:0', TOKEN)}"
    server = threading.Thread(target=driver.serve, daemon=True)
    server.start()
    client = ClientDriver(ClientOptions(address, 0, TOKEN[0]))
    client.connect()
    b = client.sc
    b.join()
    ta, tb, same = [], [], True

    def timed(fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - t

    for step, (xa, xb) in enumerate(zip(a.epoch_batches(1), b.epoch_batches(1), strict=True)):
        client.channel.step_started()
        if step % 2:  # alternate which side goes first, so drift in the machine's load cancels out
            (lb, dtb), (la, dta) = timed(b.train_step, xb, step), timed(a.train_step, xa, step)
        else:
            (la, dta), (lb, dtb) = timed(a.train_step, xa, step), timed(b.train_step, xb, step)
        same &= la == lb
        if step:  # step 0 warms both up
            ta.append(dta)
            tb.append(dtb)
    b.push_adapters(0)
    b.pull_adapters(0)
    server.join(120)
    sa, sb = statistics.median(ta), statistics.median(tb)
    return {"model": model, "inprocess_s": sa, "grpc_s": sb, "ratio": sb / sa, "same_losses": same,
            "hidden": sim.split.hidden_size}


class _Sink:
    """A coordinator that acknowledges every step message and does nothing else."""

    max_message_bytes = 1 << 30

    def step(self, call, labels):
        call.complete(None)

    def labels(self, calls):
        for c in calls:
            c.complete(None)

    def stream_opened(self, cid):
        return None

    def stream_closed(self, cid, handle):
        pass


def throughput(hidden: int, batch_size: int, max_length: int, repeats: int) -> dict:
    codec = get_codec("fp32")
    rows = [torch.randn(max_length, hidden) for _ in range(batch_size)]
    data = serde.encode(TensorMsg(Stream.act_up, 0, 0, "fp32", hidden,
                                  [SampleTensor(i, max_length, codec.encode(r)) for i, r in enumerate(rows)]))
    service = SplitComService(_Sink(), TokenAuth(TOKEN))
    server, port = start_server(service, "127.0.0.1:0", None, 1 << 30, 8)
    stream = GrpcClient(f"127.0.0.1:{port}", 0, TOKEN[0]).open_stream()
    try:
        stream.request(data)  # connect and warm up
        t0 = time.perf_counter()
        for _ in range(repeats):
            stream.request(data)
        grpc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            bytearray(data)
        copy_s = time.perf_counter() - t0
    finally:
        stream.close()
        server.stop(None)
    c = service.counters
    messages = sum(c.wire.messages.values())
    mb = len(data) * repeats / 1e6
    return {"message_bytes": len(data), "grpc_MBps": mb / grpc_s, "memcpy_MBps": mb / copy_s,
            "envelope_bytes_per_message": (c.wire.up + c.wire.down - c.serde.up - c.serde.down) / messages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch_size}, max_length {args.max_length}, "
          f"cut {args.cut}, {args.steps} steps per side (medians)")
    for model in args.models:
        r = step_times(model, args.steps, args.cut, args.batch_size, args.max_length)
        print(f"{model:>14}: step in-process {r['inprocess_s'] * 1e3:8.2f} ms, gRPC loopback "
              f"{r['grpc_s'] * 1e3:8.2f} ms, ratio {r['ratio']:.3f} (goal <= 1.15); same losses: {r['same_losses']}")
        t = throughput(r["hidden"], args.batch_size, args.max_length, args.repeats)
        print(f"{'':>14}  act_up message {t['message_bytes'] / 1e6:.2f} MB: gRPC loopback {t['grpc_MBps']:8.1f} MB/s, "
              f"memory copy {t['memcpy_MBps']:8.1f} MB/s, ratio {t['grpc_MBps'] / t['memcpy_MBps']:.3f}; "
              f"envelope +{t['envelope_bytes_per_message']:.1f} B/message")


if __name__ == "__main__":
    main()
