"""The heterogeneous fleet: device profiles, the FLOP time model, the simulated clock, cut policies
(memory_fit, adaptive) and the server's schedules. Simulation and deployment both ask it for cuts;
simulation also runs its clock, and replay.py replays a finished run's clock on another fleet."""
