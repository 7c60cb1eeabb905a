"""The reward scorer: serves trained reward models to RL pipelines over gRPC and HTTP.

Modules: `batcher` (cross-request dynamic batching), `backends` (torch / vLLM forward
passes), `encoding` (request items to token ids), `registry` (named, hot-swappable
models), `servicer` (gRPC RewardService), `http` (OpenRLHF and vLLM-compatible shims),
`server` (wiring, health, drain), `main` (`synpref scorer`).
"""
