"""Federation: client and server step logic, per-layer aggregation, the rounds loop (simulation) and the
centralized baseline. The fleet (devices, cuts, clock, schedules) is ``splitcom.fleet``; real server and
client processes are ``splitcom.deploy``."""
