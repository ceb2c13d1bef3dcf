"""The step's vocabulary, below the engine, the scheduler and the attention backends that all
speak it: a `Request` as the engine tracks it (request.py), the plan of query rows a step runs
and the scheduler's choice behind it (plan.py), and the per-step context attention layers read
(forward_context.py). Nothing here imports engine/, backends/ or spec_decode/."""
