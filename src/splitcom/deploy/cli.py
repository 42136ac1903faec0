"""``splitcom server`` and ``splitcom client``: one training run over gRPC, one process per side.

Exit codes: 0 done; 2 bad input (config key, file, argument; one line naming it); 3 the server refused
the client's token or id; 4 the run could not go on (server unreachable, too few clients, aborted).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from splitcom.errors import UserError

console = Console(stderr=True)
FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _fail(message: str, code: int) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _tokens(path: Path | None, out: Path, num_clients: int, resume: bool = False) -> dict[int, str]:
    """The run's tokens: ``--tokens FILE``, else OUT/tokens.yaml. A resumed run keeps the tokens it was started
    with (the file named in OUT/server.json); it never mints new ones, which would lock its clients out."""
    from splitcom.transport.security import generate_tokens, load_tokens, write_tokens

    generated = out / "tokens.yaml"
    if path is None and resume:
        started = out / "server.json"
        given = json.loads(started.read_text()).get("tokens_file") if started.is_file() else None
        if given is not None and generated.resolve() != Path(given).resolve():
            if not Path(given).is_file():
                raise UserError(f"this run was started with --tokens {given}, which is gone: pass --tokens again "
                                "(the clients hold the tokens of that file)", where="--tokens")
            path = Path(given)
        elif generated.is_file():
            path = generated
        else:
            raise UserError(f"no tokens for the resumed run ({generated} is missing): pass --tokens with the file "
                            "the run was started with", where="--tokens")
    elif path is None and generated.is_file():
        path = generated  # a run started again in the same OUT keeps its tokens
    if path is not None:
        tokens = load_tokens(path)
        missing = [cid for cid in range(num_clients) if cid not in tokens]
        if missing:
            raise UserError(f"no token for client(s) {missing}", where=str(path))
        return tokens
    out.mkdir(parents=True, exist_ok=True)
    tokens = generate_tokens(num_clients)
    write_tokens(generated, tokens)
    console.print(f"generated a token per client in {generated} (readable by you only)")
    return tokens


RESUME_SETTABLE = ("federation.client_timeout_s", "federation.min_clients")  # how the server waits, not what it trains


def server_cmd(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: dotted.key=value (repeatable).")] = None,
    bind: Annotated[str, typer.Option(help="HOST:PORT to listen on (port 0: any free port).")] = "127.0.0.1:50051",
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM): enables TLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(help="Mutual TLS: CA that signs client certificates.")] = None,
    tokens: Annotated[Path | None, typer.Option(help="YAML mapping client id -> token (default: generate "
                                                     "OUT/tokens.yaml).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("runs/latest"),
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this OUT directory from its last "
                                                     "finished round.")] = None,
    join_timeout: Annotated[float | None, typer.Option(help="Seconds to wait for all clients before starting "
                                                            "with federation.min_clients.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Start afresh in an OUT that holds a run.")] = False,
) -> None:
    """Serve a split federated run to `splitcom client` processes; writes the same OUT files as `run`."""
    logging.basicConfig(level=logging.INFO, format=FMT)
    try:
        from splitcom.config import load_config
        from splitcom.deploy.plan import DeployError, check_deployable
        from splitcom.deploy.server import ServerDriver
        from splitcom.runlog import write_json
        from splitcom.transport.security import plaintext_warning, server_credentials, split_address

        if resume is None:
            from splitcom.runlog import check_out_dir

            check_out_dir(out, force)
        else:
            if config is not None:
                raise UserError("a resumed run uses OUT/config.yaml; drop --config", where="--config")
            out, config = resume, resume / "config.yaml"
        cfg = load_config(config, set_ or [])
        if resume is not None and set_:
            from splitcom.config import config_diff

            # the plan, the rate schedule, the caches and the checkpoint all follow the run's own config
            if bad := [k for k in config_diff(load_config(config), cfg, {"logging"}) if k not in RESUME_SETTABLE]:
                raise UserError(f"a resumed run trains on as it began: --set may change logging.* and "
                                f"{', '.join(RESUME_SETTABLE)} only, not {', '.join(bad)}", where=str(config))
        cfg.logging.progress = False
        check_deployable(cfg)
        host, _ = split_address(bind)
        creds = server_credentials(tls_cert, tls_key, tls_client_ca)
        warning = plaintext_warning(host, creds is not None)
        if warning:
            logging.getLogger("splitcom.server").warning(warning)
        token_map = _tokens(tokens, out, cfg.federation.num_clients, resume=resume is not None)
        tokens_file = str((tokens if tokens is not None else out / "tokens.yaml").resolve())
        if resume is not None and tokens is None and (out / "server.json").is_file():
            tokens_file = json.loads((out / "server.json").read_text()).get("tokens_file", tokens_file)
        driver = ServerDriver(cfg, out, resume=resume is not None)
        driver.join_timeout_s = join_timeout
        port = driver.listen(bind, token_map, creds)
        address = f"{host}:{port}"
        write_json(out / "server.json", {"address": address, "pid": os.getpid(), "session": driver.session,
                                         "tls": creds is not None, "tokens_file": tokens_file})
        console.print(f"listening on {address} ({'TLS' if creds else 'no TLS'}), session {driver.session}; "
                      f"waiting for {cfg.federation.num_clients} clients")
        summary = driver.serve()
    except (UserError, DeployError) as err:
        _fail(str(err), err.exit_code)
    console.print(f"[bold]done[/] in {summary['wall_s']:.1f} s -> {out}/ (summary.json, metrics.jsonl, config.yaml, "
                  "adapter/)")
    console.print(f"val loss {summary['initial_val_loss']:.4f} -> {summary['val_loss']:.4f} (ppl "
                  f"{summary['val_ppl']:.2f}); payload up {summary['bytes_up'] / 1e6:.2f} MB, down "
                  f"{summary['bytes_down'] / 1e6:.2f} MB; envelopes +{summary['envelope_bytes']} B")
    if summary["dropped"]:
        console.print(f"dropped: {summary['dropped']}")


def client_cmd(
    server: Annotated[str, typer.Option(help="HOST:PORT of `splitcom server`.")],
    client_id: Annotated[int, typer.Option(help="This client's id (0 .. num_clients - 1).")],
    token: Annotated[str, typer.Option(help="This client's token.", envvar="SPLITCOM_TOKEN")],
    tls_ca: Annotated[Path | None, typer.Option(help="CA certificate that signs the server's (PEM): enables "
                                                     "TLS.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Mutual TLS: this client's certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Mutual TLS: this client's private key (PEM).")] = None,
    data: Annotated[str | None, typer.Option(help="This client's copy of the dataset (data.dataset, e.g. "
                                                  "e2e:DIR); default: the server's setting.")] = None,
    device: Annotated[str | None, typer.Option(help="train.device for this client: cpu, cuda or auto.")] = None,
    reconnect_timeout: Annotated[float, typer.Option(help="Seconds to keep trying to reach the server.")] = 120.0,
    state_dir: Annotated[Path | None, typer.Option(help="Keep this client's optimizer state here after every round, "
                                                        "so a restarted client process rejoins a resumed run "
                                                        "exactly (without it, a new process starts with an empty "
                                                        "AdamW state and warns).")] = None,
) -> None:
    """Train one client of a `splitcom server` run (its config comes from the server)."""
    logging.basicConfig(level=logging.INFO, format=FMT)
    try:
        from splitcom.deploy.client import ClientDriver, ClientOptions
        from splitcom.deploy.plan import DeployError
        from splitcom.transport.security import plaintext_warning, split_address

        host, _ = split_address(server)
        warning = plaintext_warning(host, tls_ca is not None)
        if warning:
            logging.getLogger("splitcom.client").warning(warning)
        opts = ClientOptions(server, client_id, token, *(None if p is None else str(p) for p in (tls_ca, tls_cert,
                                                                                                   tls_key)),
                             data=data, device=device, reconnect_s=reconnect_timeout,
                             state_dir=None if state_dir is None else str(state_dir))
        summary = ClientDriver(opts).run()
    except UserError as err:
        _fail(str(err), err.exit_code)
    except DeployError as err:
        _fail(str(err), err.exit_code)
    console.print(f"client {summary['client']} done: {summary['steps']} steps ({summary['rejected_steps']} "
                  f"rejected), sent {summary['bytes_up'] / 1e6:.2f} MB, received {summary['bytes_down'] / 1e6:.2f} MB, "
                  f"peak RSS {summary['peak_rss_bytes'] / 1e6:.0f} MB ({summary['rss_before_model_bytes'] / 1e6:.0f} MB "
                  "before the model)")
