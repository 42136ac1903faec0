"""Deployment: ``splitcom server`` and ``splitcom client`` (cli.py), the server's rounds loop (server.py,
with the gRPC entry points in coordinator.py and its checkpoint and summary in outputs.py), the loop of
each client process (client.py) and the plan of rounds both share (plan.py).

The step logic is simulation's: the server process runs ``SplitServer.handle_bytes`` and
``aggregate``, every client process runs ``SplitClient`` over a ``GrpcChannel``. What deployment adds:

* a **turn gate**: clients compute concurrently, the server serves their step requests one at a time
  in the order of ``federation.schedule`` (``round_robin``: by step index, then client id, exactly
  simulation's lockstep, so a run ends with the same adapters as ``splitcom run``);
* **faults**: a client that does not send its next step or upload within
  ``federation.client_timeout_s`` (or whose connection closes) is dropped from the round; the round is
  aggregated if ``federation.min_clients`` finished it; the client may rejoin for the next round;
* **resume**: after every finished round the server checkpoints (OUT/checkpoint.pt: the global
  adapter, every adapter set and optimizer state it holds, counters, metrics position). Clients keep
  the optimizer state of their last two round starts in memory and clear their label cache when they
  join, so after ``splitcom server --resume OUT`` the surviving clients replay the interrupted round
  from the server's last global adapter: the final adapters equal those of an uninterrupted run when
  the clients survived the restart, the schedule is round_robin, LoRA dropout is 0 and temporal reuse
  is off (its caches are not checkpointed: after a restart both sides start them afresh). A client
  process that restarts begins with a fresh optimizer: correct, but no longer bit-identical.

Fault injection for tests (environment): SPLITCOM_FAULT_SERVER_EXIT_AFTER_TURNS=N and
SPLITCOM_FAULT_CLIENT_EXIT_AFTER_STEPS=N make the process exit hard (os._exit(17)) at that point;
SPLITCOM_FAULT_CLIENT_HANG_AFTER_STEPS=N (with SPLITCOM_FAULT_CLIENT_HANG_S) makes a client stall.
"""
