"""What the tests share, by job (test modules import from here, never from each other):

- ``tiny``: tiny random MLX models and heads, mlx-lm's own greedy decoding (the MLX oracle).
- ``torch_models``: tiny torch models, the MLX ones in transformers, transformers' ``generate``.
- ``oracle``: ``generate_step``'s tokens as a reference; heads that know the greedy continuation.
- ``folders``: Hugging Face folders written from tiny models.
- ``engines``: shard engines as a ring in one process; exo 0.0.x's engine test and stock node.
- ``training``, ``server``: the training and server tests' data, fixtures and clients.
- ``events``: wait for a condition, record opened files or network, a process's CPU time.
- ``processes``: commands run in-process or as processes, ring node processes, scripts.
- ``exo_harness``, ``exo1_standin``: exo 0.0.x as processes; stand-ins for exo 1.x's types.
- ``distributed_worker``: one rank of ``test_distributed.py`` (a script the launcher runs).
"""
