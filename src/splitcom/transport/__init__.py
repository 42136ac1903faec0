"""How messages move: one channel interface (base.py) over an in-process loopback (inprocess.py, simulation)
or gRPC (grpc_client.py, grpc_server.py, with TLS and tokens in security.py), counting bytes (counters.py)."""
